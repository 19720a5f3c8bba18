"""`dosewise.onednn`: the same products as `F.linear`, taken only where they pay and no gradient
is recorded, with packs that follow their weights."""

from __future__ import annotations

import copy
import pickle

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
    packs = onednn.PackedWeights()
    with torch.no_grad():
        assert onednn.uses_onednn(x, layer.weight)
        out = onednn.linear(x, layer.weight, layer.bias, packs)
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        gelu = onednn.linear(x, layer.weight, layer.bias, packs, "gelu")
        torch.testing.assert_close(gelu, F.gelu(F.linear(x, layer.weight, layer.bias)), rtol=1e-5, atol=1e-5)
        assert out.shape == (128, 65, 192) and len(packs) == 1  # one pack for both calls


def test_falls_back_where_onednn_does_not_pay_or_cannot_run():
    x, layer = big()
    assert not onednn.uses_onednn(x, layer.weight)  # grad enabled and the weight requires grad
    with torch.no_grad():
        assert not onednn.uses_onednn(x[:1, :1], layer.weight)  # 12 k multiply-adds: MKL's call is cheaper
        assert not onednn.uses_onednn(x.double(), layer.weight.double())
    packs = onednn.PackedWeights()
    out = onednn.linear(x, layer.weight, layer.bias, packs)
    assert out.requires_grad and len(packs) == 0  # autograd works on the fallback
    out.sum().backward()
    assert layer.weight.grad is not None


def test_packs_follow_in_place_changes_of_their_weights():
    x, layer = big()
    packs = onednn.PackedWeights()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    with torch.no_grad():
        before = onednn.linear(x, layer.weight, layer.bias, packs)
    layer.weight.grad = torch.ones_like(layer.weight)
    optimizer.step()  # in place
    with torch.no_grad():
        after = onednn.linear(x, layer.weight, layer.bias, packs)
        torch.testing.assert_close(after, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(after, before)
        layer.load_state_dict({"weight": torch.zeros(192, 64), "bias": torch.zeros(192)})
        assert onednn.linear(x, layer.weight, layer.bias, packs).abs().max() == 0


def test_views_of_a_weight_are_packed_once_each():
    x, _ = big()
    in_proj = torch.randn(192, 64)
    packs = onednn.PackedWeights()
    with torch.no_grad():
        for _ in range(3):  # a fresh view object every call, as attention's key rows
            keys = onednn.linear(x, in_proj[64:128], None, packs)
            values = onednn.linear(x, in_proj[128:], None, packs)
    assert len(packs) == 2
    torch.testing.assert_close(keys, x @ in_proj[64:128].T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, x @ in_proj[128:].T, rtol=1e-5, atol=1e-5)


def test_copies_start_empty():
    x, layer = big()
    packs = onednn.PackedWeights()
    with torch.no_grad():
        onednn.linear(x, layer.weight, layer.bias, packs)
    assert len(packs) == 1
    assert len(copy.deepcopy(packs)) == 0
    assert len(pickle.loads(pickle.dumps(packs))) == 0
