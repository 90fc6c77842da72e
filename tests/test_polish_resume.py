"""A SIGKILLed dpl polish resumes to exactly the rows of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from test_polish import FAST, make_run

ROOT = Path(__file__).resolve().parents[1]


def polish_cmd(images: Path, run: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "dpl_tools.cli", "polish", "--images", str(images), "--out", str(out),
        "--run-dir", str(run), "--batch-size", "1", "--no-progress", *FAST,
    ]  # fmt: skip


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    images, run = make_run(tmp_path, num_images=30)
    out = tmp_path / "killed" / "labels.parquet"
    staging = out.parent / f".{out.name}.staging"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        polish_cmd(images, run, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(staging.glob("chunk-*.parquet"))) < 5:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    chunks = list(staging.glob("chunk-*.parquet"))
    assert 5 <= len(chunks) < 30, "the run should have been killed part-way"
    assert not out.exists()
    for chunk in chunks:  # every chunk left behind is a whole, readable file
        pq.read_table(chunk)

    resumed = subprocess.run(
        polish_cmd(images, run, out), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not staging.exists()
    reference = tmp_path / "reference.parquet"
    subprocess.run(polish_cmd(images, run, reference), cwd=ROOT, env=env, check=True,
                   capture_output=True)  # fmt: skip
    got, want = rows(out), rows(reference)
    assert len({r["file_name"] for r in want}) == 30
    assert got == want  # same rows, same order, no duplicates

    again = subprocess.run(
        polish_cmd(images, run, out), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert rows(out) == want
