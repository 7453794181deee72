"""Which input phase two trains on: cached activations or the images, whichever costs less.

The cached-activation path pays once (the cut cache, about one stage-one pass
over every image, and ``AUG_COPIES`` augmented copies of every training image,
each about one pass of the frozen part) and then trains the top of the
network in a fraction of a second per epoch. The image path pays a full
forward pass (and the backward pass through the unfrozen layers) every
epoch. A short run is cheaper on the images; a long one, or one whose caches
are already on disk, on the activations.

:func:`estimate_paths` gives both costs in seconds from per-image costs
(:class:`PathCosts`), :func:`choose_path` picks the cheaper and
:func:`describe_choice` says which and why in one line. All three are pure
functions of their arguments. :meth:`PathCosts.from_stage_one` scales the
factors below by the stage-one seconds per image recorded in the cache, so
the estimate follows the machine and the backbone.

Validation runs the top of the network on the val images' activations at the
cut on both paths (:mod:`pipeline.finetuning.validation`): read from the cut
cache on cached activations, made once by the frozen part on the images (with
the test images', for the final predictions) on the images.
"""

from __future__ import annotations

from dataclasses import dataclass

# Seconds per image of each step, in stage-one seconds per image (decoding included).
# Measured on hymenoptera (MobileNetV2, last block, 8 copies, 2 busy CPU cores, TensorFlow):
# `make bench-finetune` gave a training step on images 2.25, a copy at the cut 1.31 and a
# step on cached activations 0.30; the epochs of `make finetune` 1.6, 1.05 and 0.1. Rounded
# between the two; the choice moves little with them (the caches pay from 5 epochs either way).
IMAGE_STEP = 2.0  # a training image through the whole network: augment, forward, backward
IMAGE_EVAL = 1.0  # a validation image through the whole network (when there is no cut)
VIEW = 1.2  # an augmented copy at the cut
CUT = 1.0  # an image into the cut cache
TOP_STEP = 0.2  # a training step of the top on cached activations
TOP_EVAL = 0.05  # a validation image of the top

MODES = ("auto", "activations", "images")


@dataclass(frozen=True)
class PathCosts:
    """Seconds per image of each step of the two paths.

    Attributes
    ----------
    image_step, image_eval : float
        A training image through the whole network (decode, augment, forward,
        backward through the unfrozen layers); a validation image (forward; not
        in the estimate, which has a cut: validation runs there).
    view, cut : float
        An augmented copy of a training image at the cut; an image into the cut cache.
    top_step, top_eval : float
        A training and a validation image of the top on cached activations.
    """

    image_step: float
    image_eval: float
    view: float
    cut: float
    top_step: float
    top_eval: float

    @classmethod
    def from_stage_one(cls, seconds_per_image: float) -> PathCosts:
        """The measured factors above, times stage one's seconds per image."""
        s = max(float(seconds_per_image), 1e-6)
        return cls(IMAGE_STEP * s, IMAGE_EVAL * s, VIEW * s, CUT * s, TOP_STEP * s, TOP_EVAL * s)


@dataclass(frozen=True)
class PathEstimate:
    """Estimated seconds of phase two on each path, for ``epochs`` epochs.

    ``one_off`` is the part of ``activations`` spent building the caches (``0``
    when they are on disk), ``images_one_off`` the part of ``images`` spent on
    the frozen part's pass over the val and test images; ``per_epoch_images`` and
    ``per_epoch_activations`` the rest per epoch; ``break_even`` the fewest
    epochs at which the caches pay (``None``: never, an epoch on activations
    costs as much as on images).
    """

    epochs: int
    images: float
    activations: float
    one_off: float
    per_epoch_images: float
    per_epoch_activations: float
    break_even: int | None
    images_one_off: float = 0.0


def estimate_paths(
    costs: PathCosts,
    *,
    n_train: int,
    n_val: int,
    n_images: int,
    epochs: int,
    copies: int,
    cut_cached: bool = False,
    views_cached: bool = False,
) -> PathEstimate:
    """Seconds of ``epochs`` phase-two epochs on the images and on cached activations.

    ``n_images`` counts every image (the cut cache holds them all), ``copies``
    the augmented copies per training image (``0``: no augmentation, training
    reads the cut cache). Caches already on disk cost nothing. Validation is
    the top on activations on both paths; on the images the val and test
    images (``n_images - n_train``) first pass through the frozen part once.

    Examples
    --------
    >>> costs = PathCosts(1.6, 1.0, 1.1, 1.0, 0.08, 0.02)
    >>> e = estimate_paths(costs, n_train=100, n_val=50, n_images=150, epochs=3, copies=8)
    >>> round(e.images), round(e.activations), e.break_even
    (533, 1057, 7)
    """
    epochs = max(0, int(epochs))
    per_images = n_train * costs.image_step + n_val * costs.top_eval
    per_activations = n_train * costs.top_step + n_val * costs.top_eval
    images_one_off = max(0, n_images - n_train) * costs.cut
    one_off = 0.0 if cut_cached else n_images * costs.cut
    if copies > 0 and not views_cached:
        one_off += n_train * copies * costs.view
    saving = per_images - per_activations
    break_even = None
    if saving > 0:  # the ceiling: whole epochs
        break_even = max(1, -int(-(one_off - images_one_off) // saving))
    return PathEstimate(
        epochs=epochs,
        images=images_one_off + epochs * per_images,
        activations=one_off + epochs * per_activations,
        one_off=one_off,
        per_epoch_images=per_images,
        per_epoch_activations=per_activations,
        break_even=break_even,
        images_one_off=images_one_off,
    )


def choose_path(estimate: PathEstimate) -> str:
    """``"activations"`` when the caches pay within the run's epochs, else ``"images"``."""
    return "activations" if estimate.activations < estimate.images else "images"


def describe_choice(estimate: PathEstimate, chosen: str, *, copies: int) -> str:
    """One line: what phase two trains on, and the estimate that chose it."""
    e = estimate
    what = f"the caches ({copies} augmented copies per image)" if copies else "the cut cache"
    pays = f"they pay from {e.break_even} epochs" if e.break_even else "they never pay"
    if chosen == "images":
        return (
            f"phase 2: on the images, a full forward pass every epoch: about {e.images:.0f} s "
            f"for EPOCHS={e.epochs}, against {e.activations:.0f} s on cached activations "
            f"({e.one_off:.0f} s to build {what} first; {pays}); "
            "PHASE_TWO=activations builds them anyway"
        )
    build = (
        f"{e.one_off:.0f} s to build {what}, then {e.per_epoch_activations:.1f} s per epoch"
        if e.one_off
        else "its caches are on disk"
    )
    return (
        f"phase 2: on cached activations: about {e.activations:.0f} s for EPOCHS={e.epochs} "
        f"({build}), against {e.images:.0f} s on the images ({e.per_epoch_images:.1f} s per "
        "epoch); PHASE_TWO=images trains on the images"
    )
