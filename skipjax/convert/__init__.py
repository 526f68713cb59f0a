"""HF checkpoints (safetensors first) → skipjax config + params: `skipjax.convert.hf.load`."""
from skipjax.convert import export, hf
from skipjax.convert.hf import load, positions_from_mask
from skipjax.convert.reader import ConversionError
