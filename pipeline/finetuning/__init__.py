"""Stage three (optional): unfreeze the backbone's last layers and retrain at a low rate,
starting from the stage-two softmax head.

:func:`finetune` runs it with a :class:`FinetuneConfig`. The modules, from the bottom up:
``freezing`` (which layers train), ``layers`` (preprocessing as a Keras layer), ``image_feed``,
``checkpoints``, ``training``, ``activations`` (the cut-activation cache), ``config``,
``model``, ``inputs``, ``outputs`` and ``run``."""

from pipeline.finetuning.config import FinetuneConfig
from pipeline.finetuning.outputs import FinetuneResult
from pipeline.finetuning.run import finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]
