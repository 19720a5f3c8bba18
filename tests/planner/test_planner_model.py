"""The planner's networks: output shapes, causality in time (history and unrolled actions),
independence of batch rows, and step-by-step unrolling equal to the parallel unroll."""

from __future__ import annotations

import torch

from dosewise.planner.model import (
    RATE_LEVELS,
    PlannerModel,
    PlannerStats,
    causal_mask,
    expected_class,
)
from tests.planner.conftest import tiny_run


def make_model(tiny_windows) -> PlannerModel:
    run = tiny_run()
    model = PlannerModel(run.model, run.windows.max_len, run.windows.pre_len)
    model.set_stats(PlannerStats.from_windows(tiny_windows["train"]))
    return model.eval()


def inputs(batch):
    return batch.history, batch.history_mask, batch.static


def test_output_shapes(tiny_windows, tiny_batch):
    model = make_model(tiny_windows)
    b, k = tiny_batch.actions.shape[:2]
    out = model(*inputs(tiny_batch), tiny_batch.actions)
    assert out.policy_logits.shape == (b, k, 2, RATE_LEVELS)
    assert out.value.shape == (b, k)
    assert out.reward.shape == (b, k)
    assert out.bis_logits.shape == (b, k, 101)
    assert out.map_logits.shape == (b, k, 201)
    assert out.states.shape == (b, k + 1, model.config.d_model)
    memory, padding = model.represent(*inputs(tiny_batch))
    assert memory.shape == (b, model.max_len + 1, model.config.d_model) and padding.shape == (b, model.max_len + 1)
    assert torch.isfinite(memory).all()  # fully padded prefixes still attend to the covariate token
    assert model.act(*inputs(tiny_batch)).shape == (b, 2)
    bis = expected_class(out.bis_logits)
    assert ((bis >= 0) & (bis <= 100)).all()


def test_written_out_encoder_equals_the_module(tiny_windows, tiny_batch):
    """`encode` = nn.TransformerEncoder with the causal and padding masks, in eval mode (the
    module's fast path) and in training (its autograd path), outputs and gradients."""
    model = make_model(tiny_windows).double()
    b, n, d = 6, model.max_len + 1, model.config.d_model
    tokens = torch.randn(b, n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    padding = torch.arange(n) < torch.tensor([0, 1, 5, 20, n - 3, n - 1]).unsqueeze(1)  # left padding
    padding[:, 0] = False  # the covariate token is never padding
    for training in (False, True):
        model.train(training)
        ours = tokens.clone().requires_grad_()
        theirs = tokens.clone().requires_grad_()
        out = model.encode(ours, padding)
        expected = model.encoder(theirs, mask=causal_mask(n), src_key_padding_mask=padding)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        if training:
            weights = torch.randn_like(out)
            grads = [
                torch.autograd.grad((y * weights).sum(), [x, *model.encoder.parameters()]) for x, y in ((ours, out), (theirs, expected))
            ]
            for a, e in zip(*grads):
                torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


def test_representation_is_causal(tiny_windows, tiny_batch):
    """Changing history step j (token j + 1) never changes the outputs of tokens 0..j."""
    model = make_model(tiny_windows)
    history, mask, static = inputs(tiny_batch)
    with torch.no_grad():
        before, _ = model.represent(history, mask, static)
        for j in (3, 7, model.max_len - 1):
            changed = history.clone()
            changed[:, j] += torch.randn_like(changed[:, j]) * 10.0
            changed[:, j, 5:] = torch.randint(0, 201, changed[:, j, 5:].shape).float()  # other previous rates
            changed_mask = mask.clone()
            changed_mask[:, j] = True
            after, _ = model.represent(changed, changed_mask, static)
            assert torch.equal(after[:, : j + 1], before[:, : j + 1])
            assert not torch.allclose(after[:, j + 1], before[:, j + 1])


def test_dynamics_is_causal_and_unrolls_step_by_step(tiny_windows, tiny_batch):
    """s_{j+1} depends on actions 0..j only; unrolling one step at a time equals the parallel unroll."""
    model = make_model(tiny_windows)
    actions = tiny_batch.actions
    with torch.no_grad():
        memory, padding = model.represent(*inputs(tiny_batch))
        full = model.unroll(memory, padding, actions)
        changed = actions.clone()
        changed[:, 1] = (changed[:, 1] + 50) % 201
        after = model.unroll(memory, padding, changed)
        assert torch.equal(after[:, :1], full[:, :1])
        assert not torch.allclose(after[:, 1], full[:, 1])
        for k in range(1, actions.shape[1] + 1):
            assert torch.allclose(model.unroll(memory, padding, actions[:, :k])[:, -1], full[:, k - 1], atol=1e-5)


def test_batch_rows_are_independent(tiny_windows, tiny_batch):
    """Each sample is unrolled with its own actions: another row's input or action never
    changes a row's predictions."""
    model = make_model(tiny_windows)
    history, mask, static = inputs(tiny_batch)
    actions = tiny_batch.actions
    with torch.no_grad():
        out = model(history, mask, static, actions)
        history2, actions2 = history.clone(), actions.clone()
        history2[1:] += 5.0
        actions2[1:] = (actions2[1:] + 17) % 201
        out2 = model(history2, mask, static, actions2)
        single = model(history[:1], mask[:1], static[:1], actions[:1])
    for name in ("policy_logits", "value", "reward", "bis_logits", "map_logits"):
        assert torch.allclose(getattr(out2, name)[0], getattr(out, name)[0], atol=1e-5), name
        assert torch.allclose(getattr(single, name)[0], getattr(out, name)[0], atol=1e-5), name
        assert not torch.allclose(getattr(out2, name)[1:], getattr(out, name)[1:]), name


def test_policy_rollout_uses_each_samples_own_argmax(tiny_windows, tiny_batch):
    model = make_model(tiny_windows)
    with torch.no_grad():
        memory, padding = model.represent(*inputs(tiny_batch))
        states, actions = model.rollout_policy(memory, padding, 3)
        assert states.shape == (memory.shape[0], 3, model.config.d_model) and actions.shape == (memory.shape[0], 3, 2)
        assert torch.equal(actions[:, 0], model.policy_logits(memory[:, -1]).argmax(-1))
        for k in range(1, 3):
            expected = model.unroll(memory, padding, actions[:, :k])[:, -1]
            assert torch.allclose(states[:, k], expected, atol=1e-5)
            assert torch.equal(actions[:, k], model.policy_logits(states[:, k]).argmax(-1))


def test_policy_rollout_has_the_gradient_of_unrolling_each_prefix(tiny_windows, tiny_batch):
    """One unroll of the chosen actions gives the states, and the gradients, of unrolling every
    prefix again step by step (the way the rollout used to run)."""
    model = make_model(tiny_windows).double()
    memory, padding = model.represent(*(x.double() if x.is_floating_point() else x for x in inputs(tiny_batch)))
    states, actions = model.rollout_policy(memory, padding, 4)
    stepwise = torch.stack([memory[:, -1]] + [model.unroll(memory, padding, actions[:, :k])[:, -1] for k in range(1, 4)], 1)
    torch.testing.assert_close(states, stepwise)
    weights = torch.randn(states.shape, generator=torch.Generator().manual_seed(0), dtype=states.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    new = torch.autograd.grad((states * weights).sum(), params, retain_graph=True, allow_unused=True)
    old = torch.autograd.grad((stepwise * weights).sum(), params, allow_unused=True)
    for name, a, b in zip([n for n, p in model.named_parameters() if p.requires_grad], new, old):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, msg=name)
    assert any(a is not None and a.abs().sum() > 0 for a in new)
