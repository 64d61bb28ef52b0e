"""Library backends (ModelOpt, AutoRound, GPTQModel, msModelSlim): one module each plus one registry line.

A backend runs a library's own algorithm on qtool's calibration data and brings the result into the
shared representation, so any format that holds the scheme can write it:

    class Backend:
        name: str
        schemes: tuple[str, ...]              # scheme names it supports
        def quantize(self, model_dir, scheme, spec, samples, options, device, progress) -> BackendResult

`samples` is the [n, seqlen(+BOS)] LongTensor from calibrate.data.calibration_samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qtensor import QTensor
from qtensor.errors import QtoolError


@dataclass
class BackendResult:
    qtensors: dict[str, QTensor]  # module name -> quantized weight
    tensors: Mapping  # every other tensor of the (possibly modified, e.g. AWQ-folded) model, by checkpoint name
    notes: list = field(default_factory=list)
    options: dict = field(default_factory=dict)  # what the library was run with, recorded in qtool.json


BACKENDS: dict = {}


def register(cls):
    BACKENDS[cls.name] = cls()
    return cls


def get_backend(name: str):
    if name not in BACKENDS:
        raise QtoolError(f"backend '{name}' is not built yet (available: native{''.join(', ' + b for b in BACKENDS)})")
    return BACKENDS[name]


from . import modelopt  # noqa: E402,F401  (each module registers itself)
from . import autoround  # noqa: E402,F401
from . import gptqmodel  # noqa: E402,F401
from . import msmodelslim  # noqa: E402,F401
