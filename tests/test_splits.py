"""The split options of pipeline.data.splits: what they say, what they refuse, and that the
protocols use the same draw and the same list reader (with their own choices)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import DataError, HeadError
from pipeline.data import splits
from pipeline.heads import protocols


def test_split_config_names_its_source_as_the_user_typed_it():
    assert splits.SplitConfig().source == "stratified"
    per_class = splits.SplitConfig(seed=4, train_per_class=30)
    assert (per_class.source, per_class.words()) == ("per_class", "TRAIN_PER_CLASS=30, SEED=4")
    listed = splits.SplitConfig(split_file="lists/splits.csv")
    assert listed.source == "split_file"
    assert listed.words("ab" * 32) == "SPLIT_FILE=splits.csv (sha256 abababababab)"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train_per_class": 3, "split_file": "a.csv"}, "give one of TRAIN_PER_CLASS="),
        ({"train_per_class": 0}, r"TRAIN_PER_CLASS= \(--train-per-class\) must be"),
    ],
)
def test_bad_split_options_are_refused_in_one_line(options, message):
    with pytest.raises(DataError, match=message) as caught:
        splits.SplitConfig(**options)
    assert "\n" not in str(caught.value)


def test_the_protocols_draw_is_stage_ones_with_a_head_error():
    labels = np.repeat([0, 1], [6, 5])
    drawn = splits.per_class_split(labels, 2, seed=3)
    assert np.array_equal(drawn, protocols.per_class_split(labels, 2, seed=3))
    with pytest.raises(DataError, match="class 'b' has 5 images"):
        splits.per_class_split(labels, 5, 0, ["a", "b"])
    with pytest.raises(HeadError, match="class 'b' has 5 images"):
        protocols.per_class_split(labels, 5, 0, ["a", "b"])


def test_stage_one_keeps_val_where_the_protocols_pool_it(tmp_path: Path):
    (tmp_path / "a").mkdir()
    listed = tmp_path / "s.csv"
    listed.write_text("path,split\na/1.png,train\na/2.png,validation\na/3.png,test\n")
    paths = ["a/1.png", "a/2.png", "a/3.png", "a/4.png"]
    own = splits.split_file(listed, paths, tmp_path)
    assert own.tolist() == ["train", "val", "test", ""]  # a/4.png: not listed
    pooled = protocols.split_file(listed, paths, tmp_path)
    assert pooled.tolist() == ["train", "train", "test", ""]
