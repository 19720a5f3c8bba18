"""`dosewise.onednn`: the same products as `F.linear`, taken only where they pay and no gradient
is recorded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dosewise import onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")


def big() -> tuple[torch.Tensor, torch.nn.Linear]:
    torch.manual_seed(0)
    return torch.randn(128, 65, 64), torch.nn.Linear(64, 192)


def test_equals_f_linear_and_fused_gelu():
    x, layer = big()
    with torch.no_grad():
        assert onednn.uses_onednn(x, layer.weight)
        out = onednn.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        gelu = onednn.linear(x, layer.weight, layer.bias, "gelu")
        torch.testing.assert_close(gelu, F.gelu(F.linear(x, layer.weight, layer.bias)), rtol=1e-5, atol=1e-5)
        assert out.shape == (128, 65, 192)


def test_follows_in_place_changes_of_the_weight():
    """Nothing is cached: after an optimiser step the product uses the new weight."""
    x, layer = big()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    with torch.no_grad():
        before = onednn.linear(x, layer.weight, layer.bias)
    layer.weight.grad = torch.ones_like(layer.weight)
    optimizer.step()
    with torch.no_grad():
        after = onednn.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(after, F.linear(x, layer.weight, layer.bias).detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)


def test_rows_of_a_weight_as_in_attention():
    x, _ = big()
    in_proj = torch.randn(192, 64)
    with torch.no_grad():
        assert onednn.uses_onednn(x, in_proj[64:128])
        keys = onednn.linear(x, in_proj[64:128], None)
    torch.testing.assert_close(keys, x @ in_proj[64:128].T, rtol=1e-5, atol=1e-5)


def test_falls_back_where_onednn_does_not_pay_or_cannot_run():
    x, layer = big()
    assert not onednn.uses_onednn(x, layer.weight)  # grad enabled and the weight requires grad
    with torch.no_grad():
        assert not onednn.uses_onednn(x[:1, :1], layer.weight)  # 12 k multiply-adds: MKL's call is cheaper
        assert not onednn.uses_onednn(x.double(), layer.weight.double())
        assert not onednn.uses_onednn(x, layer.weight.T.contiguous().T)  # not contiguous
    out = onednn.linear(x, layer.weight, layer.bias)
    assert out.requires_grad  # autograd works on the fallback
    out.sum().backward()
    assert layer.weight.grad is not None
