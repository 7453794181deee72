"""Run the Makefile against a stand-in ``python`` that prints the arguments it received.

No Keras, no virtual environment: a make run takes milliseconds, and the test sees the exact
argument list the CLI would get (``make -n`` shows only the recipe's text).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fake_venv(root: Path) -> Path:
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'make': os.environ.get('PIPELINE_FROM_MAKE')}))\n"
    )
    python.chmod(0o755)
    (venv / ".installed").touch()
    return venv


def run_make(tmp_path: Path, target: str, *assignments: str) -> list[dict]:
    """Each pipeline call ``make <target> <assignments>`` makes: ``{"argv": [...], "make": "1"}``."""
    return run_make_with_stderr(tmp_path, target, *assignments)[0]


def run_make_with_stderr(tmp_path: Path, target: str, *assignments: str) -> tuple[list[dict], str]:
    """:func:`run_make`'s calls, and what make wrote to stderr (its warnings)."""
    venv = fake_venv(tmp_path) if not (tmp_path / "venv").exists() else tmp_path / "venv"
    done = subprocess.run(
        ["make", "-s", "-f", str(REPO / "Makefile"), "-o", f"{venv}/.installed", f"VENV={venv}",
         f"ASSETS={tmp_path / 'no-assets'}", target, *assignments],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()], done.stderr
