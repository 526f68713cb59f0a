"""Data: sources (synthetic, local text, tfds) -> packed int32 batches.

    ds = data.get_dataset(config.data, split="train", seed=0, workdir=workdir)
    batch = ds.batch(step)  # {'inputs', 'targets'[, 'difficulty']}: [B, T]

`batch(step)` is a pure function of (seed, step), so a resumed run sees the
batches it would have seen. See `pipeline` for sources and splits, `packing`
for packing and ordering, `tokenizer` for the tokenizers and `synthetic` for
the mixed-difficulty task (`DIFFICULTY_CLASSES`, ideal losses).
"""

from skipjax.data.config import default_config
from skipjax.data.pipeline import Dataset
from skipjax.data.pipeline import get_dataset
from skipjax.data.synthetic import DIFFICULTY_CLASSES
from skipjax.data.synthetic import ideal_token_loss

__all__ = [
    "DIFFICULTY_CLASSES",
    "Dataset",
    "default_config",
    "get_dataset",
    "ideal_token_loss",
]
