"""A regular (non-editable) install works: the wheel ships every preset.

Builds the wheel from this checkout, installs it without dependencies into a fresh venv
whose only other path is this environment's site-packages (for torch & co.), and loads
every preset from outside the checkout, so the installed package, not the source tree,
is what is imported.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"cpu_mobilenet", "coco_r50_fpn", "demo", "voc_r50_fpn"}

CHECK = """
import json, dpl_tools
from dpl_tools.config import list_presets, load_config
names = list_presets()
sections = {n: sorted(load_config(n)) for n in names}
print(json.dumps({"file": dpl_tools.__file__, "presets": names, "sections": sections}))
"""


def test_wheel_ships_presets_and_loads_them(tmp_path):
    # build from a copy: an in-tree build would leave build/ in the checkout
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "dpl-*", "tests")
    shutil.copytree(ROOT, src, ignore=skip)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(src),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("dpl-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        shipped = {Path(n).stem for n in names if n.startswith("dpl_tools/configs/")}
    assert PRESETS <= shipped
    # one top-level package: the CLI lives in dpl_tools.cli, no generic "commands" package
    # that another wheel could overwrite
    assert {n.split("/")[0] for n in names if n.endswith(".py")} == {"dpl_tools"}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
        cwd=tmp_path,
    )
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # dependencies (torch, yaml, ...) from this environment, after the venv's own packages
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    out = subprocess.run(
        [str(py), "-c", CHECK], check=True, capture_output=True, text=True, cwd=tmp_path
    )
    import json

    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(found["file"]).is_relative_to(venv)
    assert PRESETS <= set(found["presets"])
    for name in PRESETS:
        assert {"model", "teacher"} <= set(found["sections"][name])
    help_out = subprocess.run(
        [str(venv / "bin" / "dpl"), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert help_out.returncode == 0 and "train-teacher" in help_out.stdout
    version = subprocess.run(
        [str(venv / "bin" / "dpl"), "--version"], capture_output=True, text=True, cwd=tmp_path
    )
    assert version.returncode == 0 and version.stdout.strip() == "dpl 0.1.0"
