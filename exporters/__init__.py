"""Formats: one module per on-disk format (encode beside decode), registered by name in base.FORMATS."""

from . import auto_round, awq, compressed_tensors, gptq, qtool  # noqa: F401  (each module registers itself)
from . import fp8_block, gguf, modelopt, msmodelslim, w8a8  # noqa: F401
from .base import FORMATS, Checkpoint, Format, detect_format, get_format, read_checkpoint, write_checkpoint

ALL = tuple(FORMATS)
__all__ = ["ALL", "FORMATS", "Checkpoint", "Format", "detect_format", "get_format", "read_checkpoint", "write_checkpoint"]
