"""Statistics of the report: classification metrics, bootstrap intervals, McNemar's test.

Pure NumPy and SciPy, no plotting and no file access, so every number in the
report can be checked against known values in isolation.

The bootstrap resamples *images* (rows) with replacement and recomputes each
metric from the confusion matrix of the resample; all resamples are computed at
once with ``np.bincount``, so 2,000 resamples of a few thousand images take
milliseconds. Intervals are percentile intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test of two classifiers on the same images.

    Attributes
    ----------
    only_a : int
        Images ``a`` gets right and ``b`` gets wrong.
    only_b : int
        Images ``b`` gets right and ``a`` gets wrong.
    both, neither : int
        Images both get right, and both get wrong.
    p_value : float
        Two-sided exact binomial p-value of ``only_a`` out of
        ``only_a + only_b`` discordant images under p = 0.5 (1.0 when there is
        no discordant image).
    """

    only_a: int
    only_b: int
    both: int
    neither: int
    p_value: float

    @property
    def n(self) -> int:
        return self.only_a + self.only_b + self.both + self.neither


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemarResult:
    """Exact (binomial) McNemar test of two paired lists of right/wrong answers.

    Parameters
    ----------
    correct_a, correct_b : array of bool, shape (n,)
        Whether classifier ``a`` (``b``) is right on each of the same ``n`` images.

    Returns
    -------
    McNemarResult
        The discordant counts and the two-sided p-value.

    Examples
    --------
    >>> a = np.array([True] * 10 + [False])
    >>> b = np.array([False] * 10 + [True])
    >>> round(mcnemar_exact(a, b).p_value, 6)
    0.011719
    """
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"need two 1-D arrays of the same length; got shapes {a.shape} and {b.shape}"
        )
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5).pvalue)
    return McNemarResult(only_a, only_b, int(np.sum(a & b)), int(np.sum(~a & ~b)), min(1.0, p))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` counts; rows are true classes, columns predictions."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro F1 of one or many confusion matrices.

    ``cm`` has shape ``(k, k)`` or ``(b, k, k)``. Conventions follow
    scikit-learn: balanced accuracy averages the recall of the classes present
    in the true labels; macro F1 averages over the classes present in the true
    labels or the predictions, with F1 = 0 for a class never predicted.
    """
    cm = np.asarray(cm, dtype=np.float64)
    diag = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)  # true counts per class
    predicted = cm.sum(axis=-2)
    total = support.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = diag.sum(axis=-1) / total
        recall = np.where(support > 0, diag / np.where(support > 0, support, 1), 0.0)
        present = support > 0
        balanced = (recall * present).sum(axis=-1) / present.sum(axis=-1)
        f1 = np.where(support + predicted > 0, 2 * diag / np.maximum(support + predicted, 1), 0.0)
        used = (support + predicted) > 0
        macro_f1 = (f1 * used).sum(axis=-1) / used.sum(axis=-1)
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "macro_f1": macro_f1}


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """F1 of each class (0 for a class neither present nor predicted)."""
    cm = confusion(y_true, y_pred, n_classes).astype(np.float64)
    diag, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    return np.where(support + predicted > 0, 2 * diag / np.maximum(support + predicted, 1), 0.0)


def top_k_accuracy(y_true: np.ndarray, scores: np.ndarray, k: int = 5) -> float:
    """Share of images whose true class is among the ``k`` highest scores (ties: lowest index)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y_true[:, None], axis=1)))


def log_loss(y_true: np.ndarray, proba: np.ndarray, eps: float = 1e-15) -> float:
    """Mean negative log probability of the true class (probabilities clipped to ``eps``)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    p = np.clip(proba[np.arange(len(y_true)), y_true], eps, 1.0)
    return float(-np.mean(np.log(p)))


def bootstrap_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of accuracy, balanced accuracy and macro F1.

    Parameters
    ----------
    y_true, y_pred : array of int, shape (n,)
        True and predicted class indices.
    n_classes : int
        Number of classes (indices run from 0 to ``n_classes - 1``).
    n_resamples : int
        Bootstrap resamples of the ``n`` images.
    confidence : float
        Coverage of the interval, in (0, 1).
    seed : int
        Seed of the resampling; the same seed gives the same intervals.

    Returns
    -------
    dict
        ``{"accuracy": (low, high), "balanced_accuracy": ..., "macro_f1": ...}``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n = len(y_true)
    if n == 0:
        return {m: (float("nan"), float("nan")) for m in METRICS}
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    cell = y_true * n_classes + y_pred
    # Blocks bound memory (indices and confusion matrices) whatever n, k and n_resamples are.
    block = max(1, min(n_resamples, 1_000_000 // (n + n_classes * n_classes)))
    for begin in range(0, n_resamples, block):
        b = min(block, n_resamples - begin)
        idx = rng.integers(0, n, size=(b, n))
        flat = cell[idx] + (np.arange(b) * n_classes * n_classes)[:, None]
        cms = np.bincount(flat.ravel(), minlength=b * n_classes * n_classes)
        values = metrics_from_confusion(cms.reshape(b, n_classes, n_classes))
        for m in METRICS:
            out[m].append(values[m])
    alpha = (1.0 - confidence) / 2
    result = {}
    for m in METRICS:
        values = np.concatenate(out[m])
        low, high = np.nanquantile(values, [alpha, 1 - alpha])
        result[m] = (float(low), float(high))
    return result


# --------------------------------------------------------------------------- diagnostics


def per_class_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support of each class of one confusion matrix.

    Rows of ``cm`` are true classes, columns predictions. A class never
    predicted has precision 0; a class absent from the true labels has recall
    0 (scikit-learn's ``zero_division=0``).
    """
    cm = np.asarray(cm, dtype=np.float64)
    diag, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    precision = np.where(predicted > 0, diag / np.maximum(predicted, 1), 0.0)
    recall = np.where(support > 0, diag / np.maximum(support, 1), 0.0)
    f1 = np.where(support + predicted > 0, 2 * diag / np.maximum(support + predicted, 1), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(int)}


def most_confused(cm: np.ndarray, top: int = 10) -> list[tuple[int, int, int]]:
    """The ``top`` off-diagonal cells with the most images: ``(true, predicted, count)``.

    Largest count first; ties in the order of the classes. Empty cells are left out.
    """
    cm = np.asarray(cm, dtype=np.int64)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    cells = [np.unravel_index(i, off.shape) for i in order]
    return [(int(i), int(j), int(off[i, j])) for i, j in cells if off[i, j] > 0]


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve and its area for binary labels ``positive`` and higher-is-positive ``scores``.

    Returns ``(fpr, tpr, auc)``; the curve starts at (0, 0), ends at (1, 1)
    and has one point per distinct score (tied scores move along a diagonal,
    as in scikit-learn). ``auc`` is NaN when one of the two classes is absent.
    """
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # end of each tie block
    tp = np.cumsum(positive)[last]
    fp = (last + 1) - tp
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), float("nan")
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def one_vs_rest_roc(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of probabilities: class 1 against class 0 for two classes, else micro-averaged
    one-vs-rest (every image-class pair is one binary decision)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape[1] == 2:
        return roc_curve(y_true == 1, proba[:, 1])
    onehot = np.zeros(proba.shape, dtype=bool)
    onehot[np.arange(len(y_true)), y_true] = True
    return roc_curve(onehot.ravel(), proba.ravel())


def reliability(y_true: np.ndarray, proba: np.ndarray, bins: int = 10) -> dict[str, list]:
    """Reliability diagram of the top-label confidence, in ``bins`` equal-width bins.

    Returns ``confidence`` (mean top probability), ``accuracy`` and ``count``
    of each non-empty bin, and ``ece``, the expected calibration error (the
    count-weighted mean gap between confidence and accuracy).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    used = count > 0
    mean_conf = np.bincount(which, confidence, bins)[used] / count[used]
    accuracy = np.bincount(which, correct, bins)[used] / count[used]
    ece = float(np.sum(count[used] * np.abs(mean_conf - accuracy)) / max(len(y_true), 1))
    return {
        "confidence": mean_conf.tolist(),
        "accuracy": accuracy.tolist(),
        "count": count[used].tolist(),
        "ece": ece,
    }
