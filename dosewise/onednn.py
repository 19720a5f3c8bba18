"""fp32 linear layers through oneDNN on CPU, where no gradient is recorded.

torch's CPU matrix products call MKL, which on the AMD Zen CPUs this project runs on takes a
generic code path: about 95 GFLOP/s on one core at 1024², against about 210 for oneDNN's fp32
matmul (`python bench/onednn_linear.py`). The arithmetic is the same IEEE fp32 (results equal
`F.linear` to rounding, tested), but oneDNN costs about 5-15 µs more per call, so `linear` takes it
only for products of at least `MIN_MULTIPLY_ADDS`, and only where autograd records nothing (the op
has no backward): inference, the search, evaluation. Elsewhere, and off CPU, in other dtypes or
without oneDNN, it is `F.linear`. The op, `torch.ops.mkldnn._linear_pointwise`, is the one
Inductor's CPU freezing path uses; given the plain weight it runs within a few per cent of a
pre-packed one (the bench times both), so nothing is cached.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this many multiply-adds (rows · in · out) MKL's lower call cost wins (bench/onednn_linear.py:
# at 128 rows, 64 -> 64 is 0.6-0.8x, 64 -> 128 0.9-1.1x, 64 -> 402 1.4-1.7x; at one row oneDNN is
# 4-6x slower).
MIN_MULTIPLY_ADDS = 1 << 20

Activation = Literal["none", "gelu"]


@cache
def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` runs x [..., in] @ weight [out, in]ᵀ on oneDNN."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if not weight.is_contiguous() or not available():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return rows * weight.shape[0] * weight.shape[1] >= MIN_MULTIPLY_ADDS


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: Activation = "none") -> Tensor:
    """activation(x @ weightᵀ + bias), on oneDNN where `uses_onednn`, else `F.linear`."""
    if not uses_onednn(x, weight):
        out = F.linear(x, weight, bias)
        return F.gelu(out) if activation == "gelu" else out
    algorithm = "none" if activation == "gelu" else ""  # exact (erf) GELU, as F.gelu's default
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], algorithm)
