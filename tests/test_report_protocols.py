"""The protocols page (pipeline.report.protocols and its sections): hand-written protocol and
curve JSON, the headline first, every seed's figure, malformed files skipped in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.report import protocol_sections, protocols
from pipeline.report.protocol_sections import headline

STEM = "mobilenet_v2_224_avg_imagenet"


def _record(scores: dict[str, list[float]], n: int = 30, **extra) -> dict:
    """A protocol record as run_protocol writes it, with these per-seed balanced accuracies."""
    seeds = list(range(len(next(iter(scores.values())))))
    heads = {}
    for head, values in scores.items():
        runs = [
            {"seed": s, "balanced_accuracy": v, "accuracy": v, "macro_f1": v,
             "params": {"C": 0.1 * (s + 1), "held_out": {"1": 0.5}}, "scheme": "3-fold",
             "n_train": 2 * n, "n_test": 100, "fit_seconds": 0.25}
            for s, v in zip(seeds, values, strict=True)
        ]  # fmt: skip
        heads[head] = {
            "mean": {"balanced_accuracy": float(np.mean(values))},
            "std": {"balanced_accuracy": float(np.std(values))},
            "fit_seconds": 0.25 * len(values),
            "seeds": runs,
        }
    return {
        "protocol": f"{n}-per-class", "metric": "balanced_accuracy", "dataset": "bugs",
        "cache": f"/x/{STEM}.h5", "classes": 2, "seeds": seeds, "stage_one_seconds": 20.0,
        "heads": heads, "seconds": 5.0, "created": "2026-12-03T16:00:00+00:00",
        "split": {"kind": "per_class", "train_per_class": n, "pool": "all rows"}, **extra,
    }  # fmt: skip


def _write(artifacts: Path, name: str, record: dict | str) -> Path:
    path = artifacts / "protocols" / "bugs" / STEM / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


TIED = {"logreg": [0.98, 0.975, 0.983, 0.979, 0.98], "svm": [0.981, 0.972, 0.978, 0.976, 0.978]}
AHEAD = {"logreg": [0.95, 0.93, 0.96], "svm": [0.90, 0.88, 0.91]}


def test_the_page_puts_the_headline_first_with_every_seeds_figure(tmp_path: Path) -> None:
    _write(tmp_path, "30-per-class.json", _record(TIED))
    page = protocols.write_protocol_page(tmp_path, "bugs")
    assert page.html == tmp_path / "protocols/bugs/index.html" and page.notes == []
    md = page.markdown.read_text()
    lead = np.mean(TIED["logreg"]), np.std(TIED["logreg"])
    first = (
        f"**30 per class over 5 seeds: logreg {lead[0]:.3f} +- {lead[1]:.3f} balanced accuracy, "
        f"svm {np.mean(TIED['svm']):.3f} +- {np.std(TIED['svm']):.3f}; no head ahead by more "
        "than the seeds' spread (logreg leads svm by 0.002 on average, ahead on 4 of 5 seeds).**"
    )
    assert md.split("## 30 per class\n\n")[1].startswith(first)
    assert "| logreg | 0.979 +- 0.003 | 0.980 | 0.975 | 0.983 | 0.979 | 0.980 | 1.25 |" in md
    assert "| 2 | C=0.3 | C=0.3 |" in md  # the values chosen on seed 2 (held_out stays in JSON)
    assert "stage one of this cache took 20.0 s, so the protocol cost 0.25 of one" in md
    html = page.html.read_text()
    assert html.index("30 per class over 5 seeds") < html.index("<table>")
    assert all(f"<td>{v:.3f}</td>" in html for v in TIED["svm"])


def test_a_lead_counts_only_on_every_seed_and_past_the_spread(tmp_path: Path) -> None:
    from pipeline.report.protocol_records import read_protocol

    def words(scores: dict, tmp: Path) -> str:
        return headline(read_protocol(_write(tmp, "x.json", _record(scores))))

    assert "logreg ahead of svm on every seed, by more than the seeds' spread (by 0.050 on" in (
        words(AHEAD, tmp_path)
    )
    assert "3 seeds are few for that" in words(AHEAD, tmp_path)
    knn = {**TIED, "knn": [0.5, 0.52, 0.51, 0.5, 0.49]}
    assert "svm within the seeds' spread of logreg; knn behind logreg on every seed" in (
        words(knn, tmp_path)
    )
    one = words({"svm": [0.9], "logreg": [0.8]}, tmp_path)
    single = read_protocol(_write(tmp_path, "x.json", _record({"svm": [0.9]})))
    assert protocol_sections.seeds_table(single)[2] == [["svm", "0.900", "0.900", "0.25"]]
    assert one.startswith("30 per class on one seed: svm 0.900 balanced accuracy, logreg 0.800;")
    assert "one seed gives no spread" in one


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps(_record({"svm": [0.9, 1.7]})), "1.7, not a score between 0 and 1"),
        (json.dumps(_record({"svm": [0.9, 0.8]}) | {"seeds": [0, 5]}), "not [0, 5]"),
        (json.dumps(_record({"svm": [0.9]}) | {"metric": "auc"}), "metric 'auc' is not one"),
        (json.dumps(_record({"svm": [0.9]}) | {"split": None}), "split is None"),
    ],
)
def test_a_malformed_file_is_skipped_in_one_warning_line(tmp_path, text, why) -> None:
    _write(tmp_path, "30-per-class.json", _record(AHEAD))
    bad = _write(tmp_path, "5-per-class.json", text)
    page = protocols.write_protocol_page(tmp_path, "bugs")
    (note,) = page.notes
    assert note.startswith(f"skipped {bad}: ") and why in note and "\n" not in note
    assert page.format().splitlines()[0] == f"warning: {note}"
    assert page.shown == ["30 per class over 3 seeds"]  # the good file is still shown
    assert "Files skipped" in page.html.read_text()


def _curve(shots=(1, 5, 10, "all")) -> dict:
    points = [
        {"shots": n, "seconds": 0.5, "scored": "test", "heads": {
            h: {"mean": 0.5 + 0.04 * i + 0.01 * j, "std": 0.02, "n_train": 2 * (n if n != "all" else 40)}
            for j, h in enumerate(("svm", "logreg"))}}
        for i, n in enumerate(shots)
    ]  # fmt: skip
    return {
        "dataset": "bugs", "cache": "/x.h5", "metric": "balanced_accuracy", "seeds": [0, 1, 2],
        "heads": ["svm", "logreg"], "points": points, "seconds": 3.0,
        "stage_one_seconds": 6.0, "created": "2026-12-03T16:00:00+00:00",
    }  # fmt: skip


def test_a_curve_shows_its_plot_table_time_and_each_seed_at_each_n(tmp_path: Path) -> None:
    _write(tmp_path, "curve.json", _curve())
    scores = {"svm": [0.61, 0.62, 0.63], "logreg": [0.7, 0.71, 0.72]}
    for n in (1, 5, 10):
        _write(tmp_path, f"{n}-per-class.json", _record(scores, n=n, part_of="curve"))
    _write(tmp_path, "30-per-class.json", _record(AHEAD))  # a protocol of its own
    page = protocols.write_protocol_page(tmp_path, "bugs")
    assert page.shown == ["30 per class over 3 seeds", "a few-shot curve, 1 to 10 per class"]
    md = page.markdown.read_text()
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections == ["## 30 per class", "## Few-shot curve"]  # the curve's N are in it
    curve = md.split("## Few-shot curve\n\n")[1]
    assert curve.startswith(
        "**Balanced accuracy by training images per class, over 3 seeds: svm 0.500 at 1 to "
        "0.580 at 10; logreg 0.510 at 1 to 0.590 at 10; on the cache's own split svm 0.620, "
        "logreg 0.630; logreg has not levelled off at 10 per class.**"
    )
    assert f"![few-shot curve]({STEM}/curve.png)" in curve
    assert "| all | 80 | 0.620 +- 0.020 | 0.630 +- 0.020 | 0.5 |" in curve
    assert "| 5 | logreg | 0.700 | 0.710 | 0.720 | 0.710 +- 0.008 |" in curve
    assert "| 10 | C=0.1 / C=0.2 / C=0.3 | C=0.1 / C=0.2 / C=0.3 |" in curve
    assert "No per-seed figures" not in curve
    (tmp_path / "protocols/bugs" / STEM / "5-per-class.json").unlink()
    curve = protocols.write_protocol_page(tmp_path, "bugs").markdown.read_text()
    assert "No per-seed figures for N = 5: the curve's files for it were written over" in curve
    assert "the curve cost 0.50 of one stage-one pass" in curve
    html = page.html.read_text()
    assert "<img alt='few-shot curve' src='data:image/png;base64," in html


def test_a_curve_that_levels_off_says_from_which_n() -> None:
    from pipeline.report.curve_section import curve_headline

    curve = _curve((1, 2, 5, 10))
    for p, mean in zip(curve["points"], (0.6, 0.9, 0.905, 0.91), strict=True):
        p["heads"]["logreg"]["mean"] = mean
    assert "logreg stays within 0.01 of its 10-per-class mean from 2 per class on" in (
        curve_headline(curve)
    )


def test_no_results_write_no_page(tmp_path: Path) -> None:
    assert protocols.write_protocol_page(tmp_path, "bugs") is None
    assert protocols.protocols_link(tmp_path, "bugs", tmp_path / "reports") == (None, [])
    assert not (tmp_path / "protocols").exists()


def test_the_reports_link_is_one_line_relative_to_the_report(tmp_path: Path) -> None:
    _write(tmp_path, "30-per-class.json", _record(AHEAD))
    link, notes = protocols.protocols_link(tmp_path, "bugs", tmp_path / "reports" / "bugs")
    assert link == {
        "sentence": "Research protocols on these images (30 per class over 3 seeds) are on",
        "href": "../../protocols/bugs/index.html",
        "text": "their own page",
        "path": str(tmp_path / "protocols/bugs/index.html"),
    }
    assert notes == []


def test_an_unwritable_page_is_a_note_not_a_failure(tmp_path: Path) -> None:
    _write(tmp_path, "30-per-class.json", _record(AHEAD))
    (tmp_path / "protocols" / "bugs" / "index.html").mkdir()  # a folder in the page's way
    link, notes = protocols.protocols_link(tmp_path, "bugs", tmp_path)
    assert link is None and len(notes) == 1
    assert notes[0].startswith("cannot write the protocols page into")


def test_what_was_run_groups_heads_chosen_the_same_way(tmp_path: Path) -> None:
    from pipeline.report.protocol_records import read_protocol

    record = _record({"svm": [0.9, 0.8], "logreg": [0.9, 0.8], "linear_eval": [0.9, 0.8]})
    for run in record["heads"]["linear_eval"]["seeds"]:
        run["scheme"] = "C from 12 values on a held-out 20% of train"
    facts = protocol_sections.described(read_protocol(_write(tmp_path, "x.json", record)))
    assert facts[2] == (
        "Hyper-parameters: svm and logreg: 3-fold cross-validation on each seed's training "
        "images; linear_eval: C from 12 values on a held-out 20% of train (the values are below)."
    )
    assert facts[0].startswith("Split: 30 training images per class, drawn for each seed from all")


def test_names_from_disk_print_as_written_never_as_markup(tmp_path: Path) -> None:
    hostile = "<b>svm</b>|x"
    _write(tmp_path, "30-per-class.json", _record({hostile: [0.9, 0.8], "logreg": [0.7, 0.6]}))
    page = protocols.write_protocol_page(tmp_path, "bugs")
    html, md = page.html.read_text(), page.markdown.read_text()
    assert "<b>svm" not in html and "&lt;b&gt;svm&lt;/b&gt;|x 0.850 +- 0.050" in html
    assert "<b>" not in md and "&lt;b&gt;svm&lt;/b&gt;\\|x" in md


def test_a_report_with_no_heads_still_writes_the_page_and_says_where(tmp_path: Path) -> None:
    from pipeline.core.errors import ReportError
    from pipeline.report.collect import write_report

    _write(tmp_path, "30-per-class.json", _record(AHEAD))
    with pytest.raises(ReportError, match="its protocol results are on .*protocols/bugs/index"):
        write_report("bugs", artifacts_dir=tmp_path)
    assert (tmp_path / "protocols/bugs/index.html").is_file()


def test_the_curves_spread_band_stays_between_0_and_1() -> None:
    """A mean of 0.95 +- 0.1 draws its band up to 1, not to 1.05."""
    from pipeline.report.figures import curve_figure

    points = [
        {"shots": n, "heads": {"svm": {"mean": m, "std": 0.1}}} for n, m in ((1, 0.05), (2, 0.95))
    ]
    record = {"dataset": "d", "metric": "balanced_accuracy", "seeds": [0, 1], "heads": ["svm"],
              "points": points}  # fmt: skip
    fig = curve_figure(record)
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() >= 0.0 and band.max() <= 1.0 and band.max() == pytest.approx(1.0)
