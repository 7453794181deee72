"""Short names a reader can hold in mind: ``svm``, ``softmax``, ``fine-tuned (last block)``.

A run's full identity (``<cache stem>/<head>``) says which backbone, input size,
weights and precision made its features; the report keeps it in ``report.json``
and in the configuration table, and shows the short label everywhere else. The
backbone joins a head's label only where the page compares several caches.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

# The two heads the report's first sentence compares, and how it names them.
SVM, SOFTMAX = "svm", "softmax"
HEAD_WORDS = {SVM: "the linear SVM", SOFTMAX: "the softmax head"}


def unfreeze_words(config: Mapping[str, Any]) -> str:
    """``last block``, ``all layers`` or ``last 12 layers`` from a fine-tuned run's options."""
    value = config.get("unfreeze", config.get("layers"))
    text = str(value).strip().lower() if value is not None else ""
    if text == "block":
        return "last block"
    if text == "all":
        return "all layers"
    if text.isdigit():
        return f"last {text} layer{'s' * (text != '1')}"
    return text  # not recorded: ""


def phase_two_words(config: Mapping[str, Any]) -> str:
    """What phase two of a fine-tuned run trained on, from its record (``phase_two_input``)."""
    given = config.get("phase_two_input")
    if not isinstance(given, Mapping):
        return "input not recorded"
    if given.get("mode") == "cached activations":
        copies = given.get("copies") or 0
        extra = f"{copies} augmented copies per training image" if copies else "no augmentation"
        return f"on cached activations of the frozen layers at {given.get('cut_layer')} ({extra})"
    reason = f" ({given['reason']})" if given.get("reason") else ""
    return f"on the images, a full forward pass every epoch{reason}"


def cache_labels(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Group -> the fewest identity words that tell the caches apart (backbone first)."""
    configs = {r["group"]: r.get("config") or {} for r in rows if r["kind"] == "head"}
    words: dict[str, list[str]] = {g: [] for g in configs}
    for key in ("backbone", "input_size", "weights_source", "pooling", "layer"):
        for group, config in configs.items():
            value = config.get(key)
            if value not in (None, ""):
                words[group].append(f"{value} px" if key == "input_size" else str(value))
        if len(set(map(" ".join, words.values()))) == len(words):
            break
    labels = {g: " ".join(w) or g for g, w in words.items()}
    if len(set(labels.values())) < len(labels):  # the identities differ elsewhere
        return {g: g for g in labels}
    return labels


def display_labels(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Run id -> its short label on the page, unique among ``rows``."""
    caches = cache_labels(rows)
    several = len(caches) > 1
    labels = {}
    for r in rows:
        config = r.get("config") or {}
        if r["kind"] == "finetuned":
            words = unfreeze_words(config)
            label = f"fine-tuned ({words})" if words else "fine-tuned"
        else:
            label = f"{r['name']} ({caches[r['group']]})" if several else r["name"]
        labels[r["run"]] = label
    counts = Counter(labels.values())
    for r in rows:  # two fine-tuned runs alike but for their name
        if counts[labels[r["run"]]] > 1:
            labels[r["run"]] = f"{labels[r['run']]}: {r['name']}"
    counts = Counter(labels.values())
    return {run: label if counts[label] == 1 else run for run, label in labels.items()}
