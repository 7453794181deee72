"""ImageNet weights in a read-only Keras home are used where they are (Keras itself looks
only in a home it can write to, else in /tmp/.keras, then downloads)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ASSETS, needs_assets

MOBILENET_V2 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@needs_assets("weights", MOBILENET_V2)
def test_a_read_only_keras_home_that_holds_the_weights_is_used(tmp_path):
    home = tmp_path / "keras"
    (home / "models").mkdir(parents=True)
    shutil.copy(ASSETS / "weights" / MOBILENET_V2, home / "models")
    code = f"""
import os, urllib.error
real_access = os.access

def access(path, mode, *args, **kwargs):  # read-only, even for root (who may write anyway)
    if mode & os.W_OK and str(path).startswith({str(home)!r}):
        return False
    return real_access(path, mode, *args, **kwargs)

os.access = access
import keras.src.utils.file_utils as file_utils

def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")

file_utils.urlretrieve = offline
from pipeline.features import backbones
model = backbones.build_feature_extractor(
    backbones.get_backbone("mobilenet_v2"), weights="imagenet", input_size=32, pooling="avg"
)
print("width", model.output_shape[-1])
"""
    env = {**os.environ, "KERAS_HOME": str(home), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "width 1280"
