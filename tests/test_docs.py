"""The README's quickstart and the docs' Python examples, run as written on a small folder.

Only the data folder changes (a folder named ``photos`` of generated images, and ``new/``
for predict); where no ImageNet weights file sits in the Keras cache, the make commands get
``WEIGHTS=none`` and their ``imagenet`` paths become ``random`` (tests never download), and
the Python examples, which name no weights, are skipped.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_folder

REPO = Path(__file__).resolve().parents[1]
KERAS_MODELS = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
IMAGENET = KERAS_MODELS / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
# The pages whose examples continue one another, in the order a reader meets them.
PAGES = ("README.md", "docs/features.md", "docs/getting-started.md", "docs/heads.md",
         "docs/predict.md", "docs/report.md", "docs/finetune.md", "docs/python-api.md")  # fmt: skip


def blocks(page: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (REPO / page).read_text(), re.S)


def quickstart() -> list[list[str]]:
    """The README's commands for one's own images, one argument list per line."""
    section = (REPO / "README.md").read_text().split("## Your own images", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def data_folders(root: Path) -> None:
    make_folder(root / "photos", per_class=10)
    make_folder(root / "new", per_class=2)


@pytest.mark.slow
def test_the_readme_quickstart_runs_as_written(tmp_path):
    data_folders(tmp_path)
    venv = Path(sys.executable).parent.parent
    real = IMAGENET.is_file()
    finetune_lines = []
    for argv in quickstart():
        assert argv[0] == "make", argv
        if not real:
            argv = [a.replace("_imagenet/", "_random/") for a in argv] + ["WEIGHTS=none"]
        if argv[1] == "finetune":
            argv += ["AUG_COPIES=2"]  # the cached copies of 16 images: enough to exercise them
        run = subprocess.run(
            ["make", "-s", "-f", str(REPO / "Makefile"), "-o", f"{venv}/.installed",
             f"VENV={venv}", *argv[1:]],
            cwd=tmp_path, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert run.returncode == 0, f"{' '.join(argv)}\n{run.stdout}\n{run.stderr}"
        assert "Traceback" not in run.stderr
        for shown in re.findall(r"(artifacts/[\w./+-]+)", run.stdout):
            assert (tmp_path / shown.rstrip(".")).exists(), f"{' '.join(argv)} printed {shown}"
        if argv[1] == "finetune":
            finetune_lines = run.stdout.splitlines()
    # One stage-one cache for every stage, and stage three started from the head just fitted.
    # (stage three's cut activations are caches of their own, pooled by "flatten")
    caches = sorted(p.name for p in (tmp_path / "artifacts/features/photos").glob("*_avg_*.h5"))
    assert len(caches) == 1, caches
    assert any("phase 1: starting from the stage-two head" in line for line in finetune_lines)
    assert not any("built artifacts/features" in line for line in finetune_lines)


@pytest.mark.slow
@pytest.mark.skipif(not IMAGENET.is_file(), reason="no ImageNet weights in the Keras cache")
def test_the_python_examples_run_as_written(tmp_path):
    data_folders(tmp_path)
    code = "\n\n".join(block for page in PAGES for block in blocks(page, "python"))
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=1200
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_the_examples_are_found():
    assert len(quickstart()) >= 6 and all(argv[0] == "make" for argv in quickstart())
    assert sum(len(blocks(page, "python")) for page in PAGES) >= 7
