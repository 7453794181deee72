"""Stage two: classifier heads fitted on cached features in seconds.

:func:`fit_heads` chooses each head's hyper-parameters by cross-validation on train,
fits it and saves it; :func:`load_head` reads a saved head back. The modules, from the
bottom up: ``softmax`` (the Keras Dense head as a scikit-learn estimator), ``registry``
(every head as data, ``GRID=`` parsing), ``search`` (the cross-validated search, grids
that move), ``store`` (saving and loading, checksums first), ``reuse`` (which saved heads
a sweep may reuse) and ``fit`` (the sweep).
"""

from pipeline.heads.fit import HeadResult, HeadResults, fit_heads
from pipeline.heads.registry import DEFAULT_HEADS, HEADS, HeadSpec, parse_grid
from pipeline.heads.softmax import SoftmaxClassifier
from pipeline.heads.store import Head, load_head, save_head

__all__ = [
    "DEFAULT_HEADS",
    "HEADS",
    "Head",
    "HeadResult",
    "HeadResults",
    "HeadSpec",
    "SoftmaxClassifier",
    "fit_heads",
    "load_head",
    "parse_grid",
    "save_head",
]
