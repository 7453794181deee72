"""The head registry of stage two: each head as data.

Every head is a scikit-learn :class:`~sklearn.pipeline.Pipeline` of three named
steps, ``("norm", ...)``, ``("pca", ...)`` and the classifier, so one
cross-validation, one evaluation and one save routine serve them all:

========  ==================================  ==============  ===========================
name      classifier                          default norm    grid (chosen by CV)
========  ==================================  ==============  ===========================
svm       ``LinearSVC``                        l2 per sample   C
rbf_svm   ``SVC(kernel="rbf")``                l2 per sample   C
logreg    ``LogisticRegression``               none            C
knn       ``KNeighborsClassifier``             l2 per sample   n_neighbors
ridge     ``RidgeClassifier``                  standard        alpha
softmax   :class:`~pipeline.heads.softmax.           none            none: learning_rate 1e-3
          SoftmaxClassifier` (Keras)                           (epochs: early stopping)
forest    ``RandomForestClassifier``           none            min_samples_leaf
========  ==================================  ==============  ===========================

The grids are where each search starts: a grid whose best value sits at an edge
with the CV score still rising there moves past it (``extend``: within bounds, at
most :data:`MAX_EXTENSIONS` values; :mod:`pipeline.heads.search`), and ``GRID=``
(:func:`parse_grid`) replaces them.

The registry (:data:`HEADS`) is data: each :class:`HeadSpec` carries the
factory of its classifier. ``HEAD=all`` fits the default heads (every one but
``forest``, which is slow on wide features and must be named). L2
normalisation before a linear SVM is the "CNN features off-the-shelf" recipe of
Razavian et al. (2014). The softmax head takes the raw features (no
normalisation step), so its ``.keras`` file maps backbone features straight to
probabilities and stage three can put it on top of the backbone as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC, LinearSVC

from pipeline.core.errors import HeadError, did_you_mean
from pipeline.core.options import check_options
from pipeline.heads.softmax import SoftmaxClassifier


@dataclass(frozen=True)
class HeadSpec:
    """One registered head: its classifier's factory, default normalisation and CV grid.

    Parameters
    ----------
    name : str
        What ``HEAD=`` takes; also the classifier's step name in the pipeline.
    description : str
        One line for listings and the manifest.
    factory : callable
        ``seed -> estimator``: a fresh, unfitted classifier with its defaults.
    norm : {"l2", "standard", "none"}
        Default normalisation step.
    grid : mapping
        Classifier parameter -> values tried by the search.
    default : bool
        Part of ``HEAD=all``.
    keras : bool
        Trains with Keras, whose fits cost tens of times a linear model's: no search,
        one fit with its grid's single values, scored on the classifier's own
        early-stopping hold-out of train.
    fold_bounded : tuple of str
        Grid parameters that cannot exceed the images of a training fold
        (``n_neighbors``).
    max_rows : int, optional
        ``HEAD=all`` leaves this head out when train holds more images than this (its
        cost grows faster than the images'); naming it fits it anyway.
    extend : mapping
        Grid parameter -> ``(low, high, factor)``: when the search's best value sits at
        an edge of the grid with the score still rising there, the grid grows by
        ``factor`` in that direction, within ``[low, high]``
        (:data:`MAX_EXTENSIONS` steps at most).
    one_core : bool
        Its solver runs on one core (liblinear, libsvm): ``JOBS=0``, the default, runs a big
        search's fits on every core (:func:`search_jobs`); BLAS-threaded solvers keep one.
    """

    name: str
    description: str
    factory: Callable[[int], BaseEstimator]
    norm: str
    grid: Mapping[str, tuple]
    default: bool = True
    keras: bool = False
    fold_bounded: tuple[str, ...] = ()
    max_rows: int | None = None
    extend: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)
    one_core: bool = False

    def estimator(self, seed: int) -> BaseEstimator:
        """A fresh, unfitted classifier (the last step of the head's pipeline)."""
        return self.factory(seed)


_REGISTRY: tuple[HeadSpec, ...] = (
    HeadSpec(
        name="svm",
        description="linear SVM (LinearSVC)",
        # The dual always, not scikit-learn's "auto" (the primal once images outnumber
        # features): on these features the dual's coordinate descent is 2 to 3 times faster
        # at every C with the same optimum (cats and dogs' search 0.85 s -> 0.50 s, the same
        # CV scores and val accuracy), standardised features included (README, "Stage two").
        factory=lambda seed: LinearSVC(C=1.0, dual=True, max_iter=10_000, random_state=seed),
        norm="l2",
        grid={"C": (0.1, 1.0, 10.0)},
        # At most 100: on L2-normalised features the dual's iterations grow with C (digits'
        # C=1000 fits took minutes against seconds at C=10 for the same CV score).
        extend={"C": (1e-4, 100.0, 10.0)},
        one_core=True,  # liblinear: one core per fit
    ),
    HeadSpec(
        name="rbf_svm",
        description="RBF-kernel SVM (SVC)",
        factory=lambda seed: SVC(kernel="rbf", C=10.0, gamma="scale", random_state=seed),
        norm="l2",
        grid={"C": (1.0, 10.0)},
        extend={"C": (1e-2, 1e4, 10.0)},
        # Kernel SVMs cost time with the square of the images (and one-vs-one pairs with the
        # square of the classes): about 3 minutes of search at 10,000 images of 100 classes.
        max_rows=10_000,
        one_core=True,  # libsvm: one core per fit
    ),
    HeadSpec(
        name="logreg",
        description="logistic regression",
        # Newton-CG, not lbfgs: at scikit-learn's default tolerance lbfgs stopped short of the
        # optimum (digits C=10: objective 9.21 after 99 iterations, 8.84 at the optimum) and
        # took 5 to 16 times longer on this project's features (README, "Stage two").
        factory=lambda seed: LogisticRegression(
            C=1.0, solver="newton-cg", max_iter=2000, random_state=seed
        ),
        # Raw features: cross-validation on both real data sets prefers them to l2 or standard.
        norm="none",
        grid={"C": (0.1, 1.0, 10.0)},
        # At most 1000: nearly unregularised fits cost newton-cg many more iterations (100
        # classes x 3,000 rows: the search went from 119 s to 238 s moving up to 1e4).
        extend={"C": (1e-4, 1e3, 10.0)},
    ),
    HeadSpec(
        name="knn",
        description="k nearest neighbours",
        factory=lambda seed: KNeighborsClassifier(n_neighbors=5),
        norm="l2",
        grid={"n_neighbors": (1, 5, 15)},
        fold_bounded=("n_neighbors",),
        extend={"n_neighbors": (1, 405, 3)},
    ),
    HeadSpec(
        name="ridge",
        description="ridge classifier",
        factory=lambda seed: RidgeClassifier(alpha=100.0),
        norm="standard",
        grid={"alpha": (10.0, 100.0, 1000.0)},
        extend={"alpha": (1e-2, 1e6, 10.0)},
    ),
    HeadSpec(
        name="softmax",
        description="Keras softmax head (Dense 64, dropout, softmax)",
        factory=lambda seed: SoftmaxClassifier(random_state=seed),
        norm="none",
        # One rate, no search: 1e-3 is what the search of (1e-3, 3e-3) chose on both real
        # data sets.
        grid={"learning_rate": (1e-3,)},
        keras=True,
    ),
    HeadSpec(
        name="forest",
        description="random forest (200 trees)",
        factory=lambda seed: RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1),
        norm="none",
        grid={"min_samples_leaf": (1, 3)},
        default=False,
    ),
)


HEADS: dict[str, HeadSpec] = {spec.name: spec for spec in _REGISTRY}


DEFAULT_HEADS: tuple[str, ...] = tuple(spec.name for spec in _REGISTRY if spec.default)


def resolve_heads(names: str | Iterable[str]) -> tuple[str, ...]:
    """Head names from user input: ``"all"``, ``"svm,logreg"`` or a list.

    Raises
    ------
    HeadError
        An unknown name, with the closest registered names suggested.
    """
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for item in names:
        for name in str(item).replace(",", " ").split():
            key = name.strip().lower().replace("-", "_")
            chosen = DEFAULT_HEADS if key in ("all", "default") else (key,)
            for head in chosen:
                if head not in HEADS:
                    raise HeadError(
                        f"unknown head {name!r}{did_you_mean(key, [*HEADS, 'all'])} "
                        f"(heads: {', '.join(HEADS)}, or all)"
                    )
                if head not in out:
                    out.append(head)
    if not out:
        raise HeadError(f"no head given; pick from {', '.join(HEADS)}, or all")
    return tuple(out)


def named_heads(names: str | Iterable[str]) -> set[str]:
    """The heads named one by one in ``names`` (not through ``all``)."""
    items = [names] if isinstance(names, str) else list(names)
    words = [w for item in items for w in str(item).replace(",", " ").split()]
    explicit = [w for w in words if w.lower() not in ("all", "default")]
    return set(resolve_heads(explicit)) if explicit else set()


def build_head(
    name: str, *, norm: str | None = None, pca: int | None = None, seed: int = 0
) -> Pipeline:
    """An unfitted head: ``Pipeline([("norm", ...), ("pca", ...), (name, classifier)])``.

    Parameters
    ----------
    name : str
        A registered head (see :data:`HEADS`).
    norm : {"l2", "standard", "none"}, optional
        Normalisation step; the head's default when omitted.
    pca : int, optional
        Keep this many principal components after normalisation.
    seed : int
        Seed of every random step.

    Raises
    ------
    HeadError
        An unknown head name, or ``norm`` or ``pca`` out of bounds (named as
        ``NORM=``/``PCA=``).

    Examples
    --------
    >>> head = build_head("svm")
    >>> [step for step, _ in head.steps]
    ['norm', 'pca', 'svm']
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import Normalizer, StandardScaler

    check_options({"norm": norm, "pca": pca}, error=HeadError)
    spec = HEADS[resolve_heads(name)[0]]
    norm = spec.norm if norm is None else norm
    norm_step = {"l2": Normalizer("l2"), "standard": StandardScaler(), "none": "passthrough"}[norm]
    pca_step = PCA(n_components=pca, random_state=seed) if pca else "passthrough"
    return Pipeline([("norm", norm_step), ("pca", pca_step), (spec.name, spec.estimator(seed))])


def planned_fits(spec: HeadSpec, cv: int, grid: Mapping[str, Sequence] | None = None) -> int:
    """Fits a head's search plans: each grid point on each fold, then one (one in all for a
    Keras head, which is not searched). A grid that moves adds ``cv`` fits per new value."""
    if spec.keras:
        return 1
    grid = spec.grid if grid is None else grid
    points = int(np.prod([len(values) for values in grid.values()])) if grid else 1
    return points * cv + 1


PARALLEL_FROM = 10_000  # train images x classes from which JOBS=0 runs a search's fits in parallel


def search_jobs(spec: HeadSpec, jobs: int, y: np.ndarray) -> int:
    """The parallel fits of a head's search on labels ``y``: ``jobs`` (``JOBS=``) as given,
    but ``0`` (the default) means every core (``-1``) for a one-core solver once train
    images times classes reach :data:`PARALLEL_FROM`, and one job otherwise: a smaller
    search takes about a second, less than starting the worker processes, and BLAS-threaded
    solvers already use the cores.
    """
    if jobs != 0:
        return jobs
    size = len(y) * len(np.unique(y))
    return -1 if spec.one_core and size >= PARALLEL_FROM else 1


MAX_EXTENSIONS = 3  # steps a grid may move past an edge, per parameter and search

GRID_EXAMPLE = 'GRID="svm:C=0.01,0.1,1;logreg:C=1e-3,1e-2"'


def parse_grid(text: str | Mapping[str, Mapping[str, Sequence]] | None) -> dict[str, dict]:
    """``GRID=``: ``"head:param=v1,v2;head:param=v1"`` -> ``{head: {param: (v1, v2)}}``.

    A mapping of the same shape is checked the same way. Each named head must be searched
    (not ``softmax``) and each parameter one of its grid's; values are numbers (whole
    numbers for ``n_neighbors`` and ``min_samples_leaf``), positive, sorted, without
    repeats. A grid given here is searched as given: it does not move at its edges.

    Raises
    ------
    HeadError
        Anything else, in one line with an example.
    """
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        entries = [(h, p, list(v)) for h, params in text.items() for p, v in params.items()]
    else:
        entries = [_grid_entry(part) for part in str(text).split(";") if part.strip()]
    out: dict[str, dict] = {}
    for head, param, values in entries:
        spec = HEADS[resolve_heads(head)[0]]
        if spec.keras:
            raise HeadError(f"GRID: {spec.name} is not searched (one fit); leave it out of GRID")
        param = {key.lower(): key for key in spec.grid}.get(param.lower(), param)
        if param not in spec.grid:
            raise HeadError(
                f"GRID: {spec.name} has no grid parameter {param!r}{did_you_mean(param, spec.grid)}"
                f" (its grid: {', '.join(spec.grid)})"
            )
        kind = int if isinstance(spec.grid[param][0], int) else float
        out.setdefault(spec.name, {})[param] = _grid_values(spec.name, param, values, kind)
    return out


def _grid_entry(part: str) -> tuple[str, str, list[str]]:
    head, colon, rest = part.strip().partition(":")
    param, equals, values = rest.partition("=")
    if not (colon and equals and head.strip() and param.strip() and values.strip()):
        raise HeadError(
            f"GRID entry {part.strip()!r} is not head:param=values; e.g. {GRID_EXAMPLE}"
        )
    return head.strip(), param.strip(), [v for v in values.split(",") if v.strip()]


def _grid_values(head: str, param: str, values: Sequence, kind: type) -> tuple:
    out = []
    for value in values:
        try:
            number = float(str(value).strip()) if isinstance(value, str) else float(value)
        except ValueError:
            number = float("nan")
        if not (np.isfinite(number) and number > 0) or (kind is int and number != int(number)):
            what = "a whole number >= 1" if kind is int else "a positive number"
            raise HeadError(
                f"GRID: {head}:{param} value {str(value).strip()!r} is not {what}; "
                f"e.g. {GRID_EXAMPLE}"
            )
        out.append(kind(number))
    if not out:
        raise HeadError(f"GRID: {head}:{param} has no values; e.g. {GRID_EXAMPLE}")
    return tuple(sorted(set(out)))
