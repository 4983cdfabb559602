"""Train and fine-tune Spleeter models: ``splitstems train -p config.json -d data_root``.

Spleeter's training, in PyTorch: the same JSON configs and dataset CSVs (or a MUSDB18
folder), cached chunks and random ``T``-frame crops, the original's loss and Adam,
checkpoints with the optimizer state, exact resume, and a model folder
(``model.safetensors`` + ``config.json``) that ``splitstems separate -p`` uses like a
released model. See :func:`train`.
"""

from splitstems.train.data import DataError
from splitstems.train.options import AUGMENTATIONS, BATCH_NORM_MODES, TrainOptions
from splitstems.train.trainer import TrainResult, build_model, evaluate, spleeter_loss, train

__all__ = [
    "AUGMENTATIONS",
    "BATCH_NORM_MODES",
    "DataError",
    "TrainOptions",
    "TrainResult",
    "build_model",
    "evaluate",
    "spleeter_loss",
    "train",
]
