"""Where ``predict`` writes (OUT= rules, default names) and what it says while it works.

A stand-in model (mean red minus mean blue, no Keras) replaces the loaded one, so these
tests decode real image files and take a fraction of a second.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, make_folder, make_image

from pipeline.core.errors import PredictError

MODEL_ID = "toy_model"


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """``predict_images`` with the stand-in model; returns the model path to pass."""
    import pipeline.predict as predict

    def run(x: np.ndarray):
        score = x[..., 0].mean(axis=(1, 2)) - x[..., 2].mean(axis=(1, 2))
        scores = np.stack([-score, score], axis=1)  # blue, red
        return np.argmax(scores, axis=1), scores, False

    predictor = predict.Predictor(
        label="toy model", dataset="colours", model_id=MODEL_ID,
        score=predict.batchwise(8, lambda x: x.astype(np.float32), run),
        class_names=("blue", "red"),
    )  # fmt: skip
    monkeypatch.setattr(predict, "load_predictor", lambda *args, **kwargs: predictor)
    model = tmp_path / "toy.json"
    model.write_text("{}")
    return model


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_out_an_existing_file_that_is_not_predictions_is_refused(toy, tmp_path, capsys):
    from pipeline.cli.main import main
    from pipeline.predict import predict_images

    images = make_folder(tmp_path / "new", per_class=2)
    precious = tmp_path / "precious.txt"
    precious.write_text("my notes\n")
    with pytest.raises(PredictError, match="exists and is not a predictions CSV"):
        predict_images(toy, images, precious)
    argv = ["predict", "--model", str(toy), "--images", str(images), "--out", str(precious)]
    assert main([*argv, "--quiet"]) == 2
    assert f"OUT={precious} exists and is not a predictions CSV" in _one_error_line(capsys)
    assert precious.read_text() == "my notes\n"
    # a predictions CSV is replaced: the same command twice works
    out = tmp_path / "out.csv"
    predict_images(toy, images, out)
    assert len(_rows(predict_images(toy, images, out).out_csv)) == 4


def test_out_a_folder_receives_the_default_file_name(toy, tmp_path):
    from pipeline.predict import predict_images
    from pipeline.predictions import images_label

    images = make_folder(tmp_path / "new", per_class=2)
    folder = tmp_path / "results"
    folder.mkdir()
    result = predict_images(toy, images, folder)
    assert result.out_csv == folder / f"{MODEL_ID}_{images_label(images)}.csv"
    assert len(_rows(result.out_csv)) == 4
    # a path ending in / is a folder, made if missing
    result = predict_images(toy, images, f"{tmp_path / 'made'}/")
    assert result.out_csv.parent == tmp_path / "made" and result.out_csv.is_file()


def test_a_long_image_name_gives_a_short_default_name(toy, tmp_path):
    from pipeline.predict import predict_images

    image = make_image(tmp_path / ("x" * 246 + ".png"), COLOURS["red"], seed=1)
    result = predict_images(toy, image, artifacts_dir=tmp_path / "art")
    assert result.out_csv.is_file() and len(result.out_csv.name) < 80
    assert result.out_csv.name.startswith("x" * 40)
    assert _rows(result.out_csv)[0]["path"] == image.name


def test_image_folders_of_the_same_name_get_their_own_default_files(toy, tmp_path):
    from pipeline.predict import predict_images

    first = make_folder(tmp_path / "b1" / "new", per_class=1, classes=("red",))
    second = make_folder(tmp_path / "b2" / "new", per_class=2, classes=("blue",))
    art = tmp_path / "art"
    one = predict_images(toy, first, artifacts_dir=art)
    two = predict_images(toy, second, artifacts_dir=art)
    assert one.out_csv != two.out_csv and one.out_csv.parent == two.out_csv.parent
    assert one.out_csv.name.startswith("new-") and two.out_csv.name.startswith("new-")
    assert len(_rows(one.out_csv)) == 1 and len(_rows(two.out_csv)) == 2


def test_a_folder_without_a_readable_image_is_an_error(toy, tmp_path, capsys):
    from pipeline.cli.main import main
    from pipeline.predict import predict_images

    images = tmp_path / "broken"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"not a jpeg")
    (images / "b.png").write_bytes(b"")
    out = tmp_path / "out.csv"
    with pytest.raises(PredictError, match="none of the 2 image files under IMAGES=.* could be"):
        predict_images(toy, images, out)
    argv = ["predict", "--model", str(toy), "--images", str(images), "--out", str(out)]
    assert main([*argv, "--quiet"]) == 2
    assert "nothing was written" in _one_error_line(capsys)
    assert not out.exists()


def test_predict_says_what_it_loads_and_shows_a_bar_over_the_images(toy, tmp_path, capsys):
    from pipeline.cli.main import main

    images = make_folder(tmp_path / "new", per_class=3)
    out = tmp_path / "out.csv"
    assert main(["predict", "--model", str(toy), "--images", str(images), "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    lines = stdout.splitlines()
    assert lines[0] == f"loading {toy} (Keras and the backbone: a few seconds)"
    assert lines[1].startswith("loaded toy model in ")
    assert "predicting:" in stderr and "0/6 [" in stderr  # the bar, over images
    assert any(line.startswith(f"wrote {out}: 6 images predicted") for line in lines)
