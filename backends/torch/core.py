"""The torch backend's emitter table: what every torch emitter module and the module class import.

A torch emitter is ``fn(*tensors, **attrs)``: the node's input tensors positionally (``None`` for an
omitted optional input) and its attributes as keywords, returning a tensor or a tuple of tensors,
exactly like the op table's reference implementation. Emitters register in :data:`EMITTERS`
(``@emitter("op")``, or with ``when=pattern, priority=n`` for a pattern); this module imports no
emitter module: ``backends.torch.backend`` imports it and all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from backends.emitters import EmitterTable

__all__ = ["EMITTERS", "Emitter", "emitter", "torch_dtype"]

Emitter = Callable[..., Any]

#: IR op name -> entries of ``fn(*tensors, **attrs)``, chosen per node by pattern.
EMITTERS = EmitterTable(
    "torch",
    signature="a function taking the input tensors positionally and the node's attributes as "
    "keywords",
    home="backends/torch/emitters.py",
    decorator="backends.torch.core.emitter",
)
emitter = EMITTERS.register


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a numpy dtype name ('float32' -> torch.float32)."""
    return torch.from_numpy(np.empty(0, dtype=name)).dtype
