"""Transfer learning for small image data sets, after "CNN features off-the-shelf".

Stage one caches frozen ImageNet backbone features to HDF5
(:func:`pipeline.features.extract_features`); stage two fits heads on them;
stage three fine-tunes. Importing the package is cheap: Keras and TensorFlow
load only when a model is built.
"""

from pipeline.console import quiet_keras_import

__version__ = "0.1.0"

quiet_keras_import()  # TensorFlow's native start-up lines, wherever Keras is first imported
