"""Stage three's choice of phase-two input, as a pure function of measured per-image costs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.core.errors import FinetuneError
from pipeline.finetuning import costs
from pipeline.finetuning.config import FinetuneConfig
from pipeline.finetuning.costs import PathCosts, choose_path, describe_choice, estimate_paths

# hymenoptera: 245 training and 153 validation images, 8 copies, stage one 0.032 s per image
HYMENOPTERA = dict(n_train=245, n_val=153, n_images=398, copies=8)
COSTS = PathCosts.from_stage_one(0.032)


def test_a_short_run_trains_on_the_images_a_long_one_on_cached_activations():
    short = estimate_paths(COSTS, epochs=3, **HYMENOPTERA)
    long = estimate_paths(COSTS, epochs=10, **HYMENOPTERA)
    assert choose_path(short) == "images"
    assert choose_path(long) == "activations"
    assert short.break_even == long.break_even == 6
    # the choice flips exactly at the break-even epoch count
    assert choose_path(estimate_paths(COSTS, epochs=5, **HYMENOPTERA)) == "images"
    assert choose_path(estimate_paths(COSTS, epochs=6, **HYMENOPTERA)) == "activations"


def test_the_estimate_adds_up_the_measured_costs():
    c = PathCosts(image_step=2.0, image_eval=1.0, view=1.5, cut=1.0, top_step=0.5, top_eval=0.25)
    e = estimate_paths(c, n_train=10, n_val=4, n_images=16, epochs=3, copies=2)
    # validation is the top on activations on both paths: no full pass per epoch
    assert e.per_epoch_images == 10 * 2.0 + 4 * 0.25
    # the images path runs its 6 val and test images through the frozen part once
    assert e.images_one_off == 6 * 1.0
    assert e.images == 6.0 + 3 * 21.0
    assert e.one_off == 16 * 1.0 + 10 * 2 * 1.5
    assert e.activations == 46.0 + 3 * (10 * 0.5 + 4 * 0.25)
    assert e.break_even == 3  # (46 - 6) s more up front / (21 - 6) s saved per epoch, rounded up


def test_caches_on_disk_make_cached_activations_the_choice_for_one_epoch():
    fresh = estimate_paths(COSTS, epochs=1, **HYMENOPTERA)
    on_disk = estimate_paths(COSTS, epochs=1, cut_cached=True, views_cached=True, **HYMENOPTERA)
    assert choose_path(fresh) == "images"
    assert on_disk.one_off == 0 and choose_path(on_disk) == "activations"
    # the cut cache alone is not the copies
    cut_only = estimate_paths(COSTS, epochs=1, cut_cached=True, **HYMENOPTERA)
    assert cut_only.one_off == pytest.approx(245 * 8 * COSTS.view)


def test_without_augmentation_only_the_cut_cache_is_paid_for():
    e = estimate_paths(COSTS, epochs=2, **{**HYMENOPTERA, "copies": 0})
    assert e.one_off == pytest.approx(398 * COSTS.cut)
    assert choose_path(e) == "activations"  # one stage-one pass pays within two epochs


def test_the_choice_does_not_depend_on_the_machine_speed_only_the_line_does():
    for epochs in (1, 3, 5, 10, 30):
        slow = estimate_paths(PathCosts.from_stage_one(0.5), epochs=epochs, **HYMENOPTERA)
        fast = estimate_paths(PathCosts.from_stage_one(0.005), epochs=epochs, **HYMENOPTERA)
        assert choose_path(slow) == choose_path(fast)


def test_no_saving_per_epoch_never_pays():
    c = PathCosts(1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    e = estimate_paths(c, epochs=100, **HYMENOPTERA)
    assert e.break_even is None and choose_path(e) == "images"


def test_one_line_says_which_and_why():
    short = estimate_paths(COSTS, epochs=3, **HYMENOPTERA)
    line = describe_choice(short, "images", copies=8)
    assert "\n" not in line
    assert line.startswith("phase 2: on the images")
    assert "EPOCHS=3" in line and "they pay from 6 epochs" in line
    assert f"about {short.images:.0f} s" in line and f"{short.activations:.0f} s" in line
    assert "PHASE_TWO=activations" in line
    long = estimate_paths(COSTS, epochs=10, **HYMENOPTERA)
    line = describe_choice(long, "activations", copies=8)
    assert line.startswith("phase 2: on cached activations") and "PHASE_TWO=images" in line
    on_disk = estimate_paths(COSTS, epochs=2, cut_cached=True, views_cached=True, **HYMENOPTERA)
    assert "on disk" in describe_choice(on_disk, "activations", copies=8)


def test_stage_one_seconds_per_image_from_the_cache_attributes():
    from pipeline.finetuning.inputs import _stage_one_seconds_per_image

    attrs = {"seconds": 12.0, "n_images": 400, "n_skipped": 0}
    assert _stage_one_seconds_per_image(attrs) == pytest.approx(0.03)
    assert _stage_one_seconds_per_image({**attrs, "n_skipped": 100}) == pytest.approx(0.04)
    assert _stage_one_seconds_per_image({}) == 0.03  # not recorded: a typical figure
    assert _stage_one_seconds_per_image({"seconds": "x", "n_images": 3}) == 0.03


@pytest.mark.parametrize("value", ["fast", "", "Images", None])
def test_phase_two_must_be_one_of_the_modes(value):
    with pytest.raises(FinetuneError, match="PHASE_TWO="):
        replace(FinetuneConfig(), phase_two=value).validate()
    assert costs.MODES == ("auto", "activations", "images")


def test_bench_finetune_reports_the_factors_and_when_the_caches_pay():
    from pipeline.benchmarks.finetune import _choice_figures, _Timings

    # 100 images: stage one 4 s, a full epoch 8 s, 8 copies 44 s, an epoch on them 1 s
    t = _Timings(4.0, 4.0, 8.0, 44.0, 0, [1.0, 1.0])
    got = _choice_figures(100, 8, t)
    assert got["factors"]["image_step"] == 2.0
    assert got["factors"]["view"] == pytest.approx(44 / 800 / 0.04, abs=0.01)
    assert got["factors"]["top_step"] == 0.25
    assert got["factors"]["used"]["view"] == costs.VIEW
    assert got["caches_pay_from_epochs"] == 7  # (4 + 44) s of caches / 7 s saved per epoch


def test_a_bad_phase_two_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    from pipeline.cli.main import main

    assert main(["finetune", "--data", str(tmp_path), "--phase-two", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "--phase-two" in err and "auto, activations or images" in err
