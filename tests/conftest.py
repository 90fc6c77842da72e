"""Shared fixtures: small synthetic detection data made on the fly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from dpl_tools.data.synthetic import make_synthetic_dataset

# Under pytest-xdist (make test runs one worker per core) each worker, and every process a
# test starts, computes on one thread: two 1-thread processes do 1.5x the work of one
# 2-thread process on 2 cores (benchmarks/RESULTS.md). A plain run uses two threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """24 images of 128x96 px with 1-3 shapes each; returns the COCO JSON path.

    Images live in ``<json dir>/images``. Session-scoped: treat as read-only.
    """
    out = tmp_path_factory.mktemp("synth")
    return make_synthetic_dataset(out, num_images=24, image_size=(128, 96), max_objects=3, seed=0)


@pytest.fixture(scope="module")
def module_dir(request, tmp_path_factory):
    """Make fresh directories for a test module's shared fixtures; they are removed when the
    module is done (kept after a failure), so a full run holds one module's checkpoints at a
    time rather than every module's (CI's disk is small)."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == 0:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
