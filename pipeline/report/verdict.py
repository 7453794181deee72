"""The verdict: the report's question answered in words, first, for the data set at hand.

Linear SVM or softmax head: their figures on the split that chooses, in the metric the
runs are ranked on (``make head METRIC=``), and the exact McNemar p-value between them
(on each image's right or wrong, whatever the metric), then the run chosen overall and its untouched test
figure, then every significant difference the page shows, one sentence each. The
HTML page, ``report.md`` and the lines ``make report`` prints all use these sentences.
"""

from __future__ import annotations

from typing import Any

from pipeline.heads.scoring import words
from pipeline.report.cells import ci, fmt, listing, ms, p_value
from pipeline.report.naming import HEAD_WORDS, SOFTMAX, SVM
from pipeline.report.ranking import ALPHA


def _rows(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["run"]: r for r in data["runs"]}


def ranked_on(data: dict[str, Any]) -> tuple[str, str]:
    """The metric the runs are ranked on and its words (``"balanced_accuracy"``,
    ``"balanced accuracy"``); accuracy in reports written before it was recorded."""
    metric = data["selection"].get("chosen_by") or "accuracy"
    return metric, words(metric)


def label(data: dict[str, Any], run: str) -> str:
    """The short name of ``run`` on the page (its id where none was given)."""
    return _rows(data).get(run, {}).get("label") or run


def _test_between(data: dict[str, Any], a: str, b: str, split: str) -> dict[str, Any] | None:
    for c in data["mcnemar"]:
        if c["split"] == split and {c["a"], c["b"]} == {a, b}:
            return c if c["a"] == a else {**c, "a": a, "b": b, "only_a": c["only_b"],
                                          "only_b": c["only_a"]}  # fmt: skip
    return None


def _paired(data: dict[str, Any], a: str, b: str, split: str, test: dict) -> tuple[str, str]:
    """``("svm beats softmax", "svm 0.96 [..], softmax 0.94 [..]; 8 images only ...")``."""
    rows = _rows(data)
    first, second = label(data, a), label(data, b)
    sa, sb = rows[a]["splits"][split], rows[b]["splits"][split]
    metric, said = ranked_on(data)
    paired = "" if metric == "accuracy" else " (on each image's right or wrong)"
    details = (
        f"{first} {ci(sa, metric)}, {second} {ci(sb, metric)} {said}; "
        f"{test['only_a']} images only {first} gets right, {test['only_b']} only {second}, "
        f"exact McNemar{paired} {p_value(test['p_value'])}"
    )
    if test["p_value"] >= ALPHA:
        return "no detectable difference", details
    better, worse = (first, second) if test["only_a"] > test["only_b"] else (second, first)
    return f"{better} beats {worse}", details


def _where(split: str, test: dict) -> str:
    untouched = "the untouched test split" if split == "test" else split
    return f"on {untouched} ({test['n']} images)"


def _question(data: dict[str, Any]) -> list[str]:
    """Linear SVM or softmax head, answered for each cache with both heads."""
    rows = _rows(data)
    groups = sorted({r["group"] for r in data["runs"] if r["kind"] == "head"})
    several = len(groups) > 1
    split = data["selection"]["compare_split"] if data["selection"]["rule"] == "val" else None
    ask = "Linear SVM or softmax head? "
    out = []
    for group in groups:
        a, b = f"{group}/{SVM}", f"{group}/{SOFTMAX}"
        on = (
            f" on {rows[a if a in rows else b]['label'].split(' (', 1)[-1][:-1]}" if several else ""
        )
        if a not in rows or b not in rows:
            fitted = SVM if a in rows else SOFTMAX if b in rows else None
            if fitted:
                out.append(f"{ask}Not answered{on}: only {HEAD_WORDS[fitted]} was fit "
                           "(`make head HEAD=svm,softmax` fits both).")  # fmt: skip
            continue
        if split is None:
            out.append(ask + _without_val(data, a, b) + on + ".")
            continue
        test = _test_between(data, a, b, split)
        if test is None:
            out.append(f"{ask}They predicted different {split} images{on}: no paired test.")
            continue
        finding, details = _paired(data, a, b, split, test)
        out.append(f"{ask}{_where(split, test).capitalize()}{on}, {finding}: {details}.")
    return out


def _without_val(data: dict[str, Any], a: str, b: str) -> str:
    """No val split: what each head scored on train, and that nothing pairs them there."""
    rows = _rows(data)
    scores = []
    for run in (a, b):
        config = rows[run]["config"]
        scheme = config.get("cv_scheme") or "cross-validation"
        scores.append(f"{label(data, run)} {fmt(config.get('cv_accuracy'))} ({scheme})")
    words = (
        "There is no val split, so the choice rests on train: "
        f"{scores[0]} against {scores[1]}; these are not the same images, so no test tells "
        "them apart there"
    )
    test = _test_between(data, a, b, "test") if "test" in rows[a]["splits"] else None
    if test:
        finding, details = _paired(data, a, b, "test", test)
        words += f". {_where('test', test).capitalize()}, {finding}: {details}"
    return words


def _chosen(data: dict[str, Any]) -> list[str]:
    chosen = data["selection"]
    row = _rows(data)[chosen["winner"]]
    board = data["leaderboard"][0]
    name = label(data, chosen["winner"])
    metric, said = ranked_on(data)
    if chosen["rule"] == "val" and f"{metric}_ci" in board:
        score = f"the best val {said}, {ci(board, metric)}"
    else:
        score = f"the best {chosen['metric']}, {board['selection_score']:.3f}"
    final = chosen["final_test"]
    if final:
        also = "" if metric == "accuracy" else f" ({ci(final, 'accuracy')} accuracy)"
        then = (
            f"on the untouched test split ({final['n']} images) it scores "
            f"{ci(final, metric)} {said}{also}: the number to quote"
        )
    else:
        then = (
            "there is no test split, so there is no untouched figure to quote (the figure "
            "it was chosen on leans optimistic)"
        )
    head, end_to_end = row.get("predict_seconds_per_image"), row.get("end_to_end_seconds_per_image")
    if row["includes_backbone"]:
        cost = f"It takes {ms(head)} ms per image from the images."
    else:
        cost = f"It takes {ms(head)} ms per image on cached features (the head alone)"
        cost += (
            f", {ms(end_to_end)} ms per image from the images, stage one included."
            if end_to_end
            else "."
        )
    return [f"Chosen overall: {name}, {score}; {then}.", cost]


def _ties(data: dict[str, Any]) -> list[str]:
    chosen = data["selection"]
    if not chosen["runner_up"]:
        return ["It is the only run ranked."]
    split, name = chosen["compare_split"], label(data, chosen["winner"])
    tied = [label(data, r) for r in chosen["tied"]]
    if tied:
        return [f"Not distinguishable from {name} on {split} (exact McNemar p ≥ {ALPHA}): "
                f"{listing(tied)}."]  # fmt: skip
    return [f"No other run is tied with {name} on {split}."]


def _differences(data: dict[str, Any], stated: set) -> list[str]:
    """One sentence per significant pairwise difference not yet stated."""
    chosen, out = data["selection"], []
    name, behind = label(data, chosen["winner"]), []
    for e in data["leaderboard"][1:]:
        test = e.get("mcnemar_vs_best")
        if test and test["p_value"] < ALPHA:
            stated.add((test["split"], frozenset((test["a"], test["b"]))))
            other = label(data, e["run"])
            behind.append(
                f"{other} ({test['only_a']} images only {name} gets right, {test['only_b']} "
                f"only {other}, exact McNemar {p_value(test['p_value'])})"
            )
    if behind:
        out.append(f"Significantly behind {name} on {chosen['compare_split']}: {listing(behind)}.")
    for c in data["mcnemar"]:
        key = (c["split"], frozenset((c["a"], c["b"])))
        if c["p_value"] >= ALPHA or key in stated:
            continue
        stated.add(key)
        finding, details = _paired(data, c["a"], c["b"], c["split"], c)
        out.append(f"{_where(c['split'], c).capitalize()}, {finding}: {details}.")
    return out


def verdict(data: dict[str, Any]) -> list[str]:
    """The verdict at the top of the report, as sentences (one paragraph each)."""
    chosen = data["selection"]
    if chosen["winner"] is None:
        return ["No run could be ranked: " + chosen["words"]]
    lines = _question(data)
    stated = {
        (split, frozenset((f"{g}/{SVM}", f"{g}/{SOFTMAX}")))
        for g in {r["group"] for r in data["runs"]}
        for split in ((chosen["compare_split"],) if chosen["rule"] == "val" else ("test",))
    }
    lines += _chosen(data) + _ties(data) + _differences(data, stated)
    if data["baselines"]:
        lines.append(
            f"{len(data['baselines'])} runs on random backbone weights are baselines, "
            "listed apart and not ranked."
        )
    return lines
