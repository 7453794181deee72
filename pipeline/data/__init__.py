"""Image folders: layouts and splits (:mod:`~pipeline.data.folders`), decoding and the batch
loader (:mod:`~pipeline.data.images`), the embedded data sets (:mod:`~pipeline.data.demo`).
Pure NumPy and Pillow: no TensorFlow, so every Keras backend reads images the same way."""

from pipeline.data.demo import write_digits
from pipeline.data.folders import ImageFolder, SplitConfig, scan_folder
from pipeline.data.images import iter_batches, load_image

__all__ = [
    "ImageFolder",
    "SplitConfig",
    "iter_batches",
    "load_image",
    "scan_folder",
    "write_digits",
]
