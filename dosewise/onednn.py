"""fp32 linear layers through oneDNN on CPU, where no gradient is recorded.

torch's CPU matrix products call MKL, which on the AMD Zen CPUs this project runs on takes a
generic code path: about 95 GFLOP/s on one core at 1024², against about 210 for oneDNN's fp32
matmul with a pre-packed weight (`python bench/onednn_linear.py`). The arithmetic is the same IEEE
fp32 (results equal `F.linear` to rounding, tested), but oneDNN costs about 11 µs more per call,
so `linear` takes it only for products of at least `MIN_MULTIPLY_ADDS`, and only where autograd
records nothing (the op has no backward): inference, the search, evaluation. Elsewhere, and off
CPU, in other dtypes or without oneDNN, it is `F.linear`. The op,
`torch.ops.mkldnn._linear_pointwise`, is the one Inductor's CPU freezing path uses.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this many multiply-adds (rows · in · out) MKL's lower call cost wins (bench/onednn_linear.py:
# at 128 rows, 64 -> 64 is 0.8x, 64 -> 128 1.1x, 64 -> 402 1.7x; at one row oneDNN is 5x slower).
MIN_MULTIPLY_ADDS = 1 << 20

Activation = Literal["none", "gelu"]


@cache
def available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")


class PackedWeights:
    """oneDNN packs of weight matrices, made on first use and made again when a weight changes:
    another storage, or an in-place write such as an optimiser step or `load_state_dict` (the
    tensor's version counter). Each entry holds its weight, so an entry never outlives it or
    stands for another tensor. Copies (deepcopy, pickling) start empty."""

    def __init__(self) -> None:
        self._packs: dict[tuple, tuple[Tensor, tuple[int, int], Tensor]] = {}

    def __call__(self, weight: Tensor, rows: int) -> Tensor:
        """The pack of `weight` [out, in] (a parameter or a view of one, e.g. the key rows of an
        attention's in_proj_weight); `rows` is a hint for its layout, any row count works."""
        base = weight if weight._base is None else weight._base  # a view shares its base's version
        key = (id(base), weight.storage_offset(), tuple(weight.shape), weight.stride())
        if base.is_inference():  # no version counter to tell a change: pack every time
            return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        stamp = (base.data_ptr(), weight._version)
        entry = self._packs.get(key)
        if entry is None or entry[0] is not base or entry[1] != stamp:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
            entry = (base, stamp, packed)
            self._packs[key] = entry
        return entry[2]

    def __len__(self) -> int:
        return len(self._packs)

    def __deepcopy__(self, memo) -> PackedWeights:
        return PackedWeights()

    def __getstate__(self) -> dict:
        return {"_packs": {}}


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` runs x [..., in] @ weight [out, in]ᵀ on oneDNN."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or not available():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return rows * weight.shape[0] * weight.shape[1] >= MIN_MULTIPLY_ADDS


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, packs: PackedWeights,
           activation: Activation = "none") -> Tensor:
    """activation(x @ weightᵀ + bias), on oneDNN where `uses_onednn`, else `F.linear`."""
    if not uses_onednn(x, weight):
        out = F.linear(x, weight, bias)
        return F.gelu(out) if activation == "gelu" else out
    rows = x.numel() // x.shape[-1]
    algorithm = "none" if activation == "gelu" else ""  # exact (erf) GELU, as F.gelu's default
    return torch.ops.mkldnn._linear_pointwise(x, packs(weight, rows), bias, activation, [], algorithm)
