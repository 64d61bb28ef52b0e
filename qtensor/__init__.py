"""The bottom layer: the quantized-tensor representation, scale math, packing, schemes, errors.

Everything else (calibrate, exporters, runtime, quantize_cli) imports from here; nothing here imports them.
"""

from .errors import GateFailed, QtoolError
from .schemes import SCHEMES, Scheme, get_scheme
from .tensor import ActQuant, QTensor

__version__ = "0.1.0"
__all__ = ["ActQuant", "GateFailed", "QTensor", "QtoolError", "SCHEMES", "Scheme", "get_scheme", "__version__"]
