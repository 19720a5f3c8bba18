"""The planner's model, after RL-DITR (Nature Medicine 2023) and MuZero: a representation
encodes the history into latent states, a dynamics network unrolls them one step per
action pair, and heads read policy, value, reward, BIS and MAP off the latent states.

Shapes: B windows, L = max_len history steps, K = pre_len unrolled steps, d = d_model,
A = RATE_LEVELS (201) levels per drug, 2 drugs (propofol, remifentanil, order RATES).

- Representation: a causal transformer encoder over L+1 tokens: token 0 carries the static
  covariates, token i (1..L) the vitals of history step i, embeddings of both rates set
  one step before and an embedding of the option flag (induction or maintenance phase). Causal: output i depends on tokens 0..i only. Left padding is masked as
  keys; the always-present covariate token keeps every query well defined.
  state_0 is the encoded history (memory [B, L+1, d]); the root latent s_0 is its last token.
- Dynamics: a transformer decoder over K tokens, token k = proj(s_0) + step k + embeddings of
  action pair a_k (each sample its own); causal self-attention (step k sees a_0..a_k) and
  cross-attention to state_0. Output k is s_{k+1}, the latent state after a_k. Because the
  self-attention is causal, running all K steps at once equals unrolling one step at a time.
- Prediction on s_k (k = 0..K-1): two categorical policies over A levels and a value.
- Reward, BIS (101 classes, 0..100) and MAP (201 classes, 0..200 mmHg) heads on s_{k+1}.

Inputs are normalised inside the model with statistics of the training windows
(`PlannerStats`), stored as buffers, so a saved state dict is self-contained. Value and reward
are predicted in normalised units; `value_in_units` / `reward_in_units` convert them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dosewise import onednn
from dosewise.data.anesthesia import RATE_MAX
from dosewise.data.windows import BIS_MAX, MAP_MAX, Windows
from dosewise.planner.config import PlannerModelConfig

# Action levels per drug (rates 0..RATE_MAX mL/h).
RATE_LEVELS = RATE_MAX + 1
N_VITALS = 5  # BIS, MAP, SBP, DBP, HR: the first five history features
N_DRUGS = 2
PREVIOUS_RATES = slice(N_VITALS, N_VITALS + N_DRUGS)  # history features 5, 6: rates set one step before
OPTION = N_VITALS + N_DRUGS  # history feature 7: the option flag (1 = induction phase)
RATE_SCALE = 100.0  # mL/h per unit of a rate's continuous input
CONCENTRATIONS = slice(OPTION + 1, OPTION + 5)  # history features 8..11 when the windows carry the pump's concentrations
CONCENTRATION_SCALE = 4.0  # µg/mL (propofol) and ng/mL (remifentanil) per unit of input


@dataclass(frozen=True)
class PlannerStats:
    """Normalisation of the training windows (float64 numbers; stored in the model as buffers)."""

    vital_mean: np.ndarray  # [5]
    vital_std: np.ndarray  # [5]
    static_mean: np.ndarray  # [S]
    static_std: np.ndarray  # [S]
    reward_mean: float
    reward_std: float
    return_mean: float
    return_std: float

    @classmethod
    def from_windows(cls, windows: Windows) -> PlannerStats:
        """Statistics over the real (unpadded) history steps, the windows' covariates, the real
        future rewards and the returns. Standard deviations are floored at 1e-3."""
        real = windows.history[windows.history_mask][:, :N_VITALS].astype(np.float64)
        rewards = windows.rewards[windows.future_mask].astype(np.float64)
        floor = lambda x: np.maximum(x, 1e-3)
        return cls(
            vital_mean=real.mean(axis=0),
            vital_std=floor(real.std(axis=0)),
            static_mean=windows.static.astype(np.float64).mean(axis=0),
            static_std=floor(windows.static.astype(np.float64).std(axis=0)),
            reward_mean=float(rewards.mean()),
            reward_std=float(floor(rewards.std())),
            return_mean=float(windows.returns.mean()),
            return_std=float(floor(windows.returns.std())),
        )


@dataclass(frozen=True)
class PlannerOutput:
    """Everything one forward pass predicts; logits are unnormalised."""

    policy_logits: Tensor  # [B, K, 2, A] from s_0..s_{K-1}
    value: Tensor  # [B, K] normalised, from s_0..s_{K-1}
    reward: Tensor  # [B, K] normalised, from s_1..s_K
    bis_logits: Tensor  # [B, K, BIS_MAX + 1] from s_1..s_K
    map_logits: Tensor  # [B, K, MAP_MAX + 1] from s_1..s_K
    states: Tensor  # [B, K + 1, d] s_0..s_K
    memory: Tensor  # [B, L + 1, d] the encoded history (state_0)
    memory_padding: Tensor  # [B, L + 1] bool, True = padding


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def causal_mask(n: int, device: torch.device | None = None) -> Tensor:
    """[n, n] bool, True where attention is NOT allowed (a later position)."""
    return torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)


class PlannerModel(nn.Module):
    """Representation, dynamics and prediction networks of the planner (module docstring)."""

    def __init__(self, config: PlannerModelConfig, max_len: int, pre_len: int, n_static: int = 5, concentrations: bool = False) -> None:
        super().__init__()
        self.config, self.max_len, self.pre_len, self.n_static = config, max_len, pre_len, n_static
        # The history carries the pump's plasma and effect-site concentrations (WindowConfig.concentrations).
        self.concentrations = concentrations
        d = config.d_model
        for name, size in (("vital_mean", N_VITALS), ("static_mean", n_static)):
            self.register_buffer(name, torch.zeros(size))
            self.register_buffer(name.replace("mean", "std"), torch.ones(size))
        for name in ("reward_mean", "return_mean"):
            self.register_buffer(name, torch.zeros(()))
            self.register_buffer(name.replace("mean", "std"), torch.ones(()))

        # Representation.
        self.vitals_in = nn.Linear(N_VITALS, d)
        if config.action_encoding == "embedding":
            self.prev_action_embed = nn.ModuleList(nn.Embedding(RATE_LEVELS, d) for _ in range(N_DRUGS))
        else:
            self.prev_action_in = _mlp(N_DRUGS, d, d)
        self.option_embed = nn.Embedding(2, d)
        if concentrations:
            self.concentrations_in = _mlp(CONCENTRATIONS.stop - CONCENTRATIONS.start, d, d)
        self.static_in = nn.Linear(n_static, d)
        self.position = nn.Embedding(max_len + 1, d)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(
                d, config.n_heads, config.ff_mult * d, config.dropout, activation="gelu", batch_first=True, norm_first=True
            ),
            config.encoder_layers,
            norm=nn.LayerNorm(d),
            enable_nested_tensor=False,
        )
        # Dynamics.
        self.root_in = nn.Linear(d, d)
        if config.action_encoding == "embedding":
            self.action_embed = nn.ModuleList(nn.Embedding(RATE_LEVELS, d) for _ in range(N_DRUGS))
        else:
            self.action_in = _mlp(N_DRUGS, d, d)
        self.step = nn.Embedding(pre_len, d)
        self.dynamics = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(
                d, config.n_heads, config.ff_mult * d, config.dropout, activation="gelu", batch_first=True, norm_first=True
            ),
            config.dynamics_layers,
            norm=nn.LayerNorm(d),
        )
        # Prediction (policy network separate from the value head, so that optimisers can split them).
        self.policy_head = _mlp(d, d, N_DRUGS * RATE_LEVELS)
        self.value_head = _mlp(d, d, 1)
        # Environment heads on s_{k+1}.
        self.reward_head = _mlp(d, d, 1)
        self.bis_head = nn.Linear(d, BIS_MAX + 1)
        self.map_head = nn.Linear(d, MAP_MAX + 1)

    # -- statistics ---------------------------------------------------------------------------

    def set_stats(self, stats: PlannerStats) -> None:
        """Copy training-window statistics into the buffers."""
        with torch.no_grad():
            for name in ("vital_mean", "vital_std", "static_mean", "static_std"):
                getattr(self, name).copy_(torch.as_tensor(getattr(stats, name), dtype=torch.float32))
            for name in ("reward_mean", "reward_std", "return_mean", "return_std"):
                getattr(self, name).fill_(float(getattr(stats, name)))

    def value_in_units(self, value: Tensor) -> Tensor:
        return value * self.return_std + self.return_mean

    def reward_in_units(self, reward: Tensor) -> Tensor:
        return reward * self.reward_std + self.reward_mean

    # -- networks -------------------------------------------------------------------------------

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """'policy': the policy network; 'env': everything else (representation, dynamics,
        value, reward, BIS and MAP heads)."""
        policy = list(self.policy_head.parameters())
        ids = {id(p) for p in policy}
        return {"policy": policy, "env": [p for p in self.parameters() if id(p) not in ids]}

    def represent(self, history: Tensor, history_mask: Tensor, static: Tensor) -> tuple[Tensor, Tensor]:
        """Encode the history.

        history [B, L, F] float (vitals, the previous propofol and remifentanil rates, the option flag,
        and with `concentrations` the pump's four concentrations: F = 8 or 12),
        history_mask [B, L] bool (True = real step), static [B, S] float.
        Returns memory [B, L+1, d] (token 0: covariates) and memory_padding [B, L+1] bool
        (True = padding, to be ignored as a key). The root latent s_0 is memory[:, -1].
        """
        tokens, padding = self.tokens(history, history_mask, static)
        return self.encode(tokens, padding), padding

    def tokens(self, history: Tensor, history_mask: Tensor, static: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's input (`represent`'s arguments): tokens [B, L+1, d] and their key padding
        [B, L+1] bool."""
        vitals = (history[..., :N_VITALS] - self.vital_mean) / self.vital_std
        previous = history[..., PREVIOUS_RATES].round().long().clamp(0, RATE_MAX)
        option = history[..., OPTION].round().long().clamp(0, 1)
        steps = self.vitals_in(vitals) + self.option_embed(option) + self.rate_tokens(previous, previous=True)
        if self.concentrations:
            steps = steps + self._head(self.concentrations_in, history[..., CONCENTRATIONS] / CONCENTRATION_SCALE)
        covariates = self.static_in((static - self.static_mean) / self.static_std).unsqueeze(1)
        tokens = torch.cat([covariates, steps], dim=1) + self.position.weight[: history.shape[1] + 1]
        padding = torch.cat([torch.zeros_like(history_mask[:, :1]), ~history_mask.bool()], dim=1)
        return tokens, padding

    def encode(self, tokens: Tensor, padding: Tensor) -> Tensor:
        """The encoder on tokens [B, n, d] with key padding [B, n] bool (True = padding), causal.

        `self.encoder` written out (its layers are norm_first, GELU): equal to
        `self.encoder(tokens, mask=causal_mask(n), src_key_padding_mask=padding)` (tested), dropout
        included, but one additive mask, built once, serves every layer, attention runs in
        `scaled_dot_product_attention` and the products in `onednn.linear`. The module merges the
        two masks in every layer, and in eval mode takes a fast path whose masked softmax is slower
        still: `bench/planner_encoder.py` times both.
        """
        b, n, d = tokens.shape
        heads = self.config.n_heads
        blocked = causal_mask(n, tokens.device) | padding.view(b, 1, 1, n)  # [B, 1, n, n]
        attend = torch.zeros(blocked.shape, dtype=tokens.dtype, device=tokens.device).masked_fill_(blocked, -math.inf)
        x = tokens
        for layer in self.encoder.layers:
            attn = layer.self_attn
            qkv = onednn.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # [B, h, n, d/h] each
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=attn.dropout if self.training else 0.0)
            out = onednn.linear(out.transpose(1, 2).reshape(b, n, d), attn.out_proj.weight, attn.out_proj.bias)
            x = x + layer.dropout1(out)
            hidden = layer.dropout(onednn.linear(layer.norm2(x), layer.linear1.weight, layer.linear1.bias, "gelu"))
            x = x + layer.dropout2(onednn.linear(hidden, layer.linear2.weight, layer.linear2.bias))
        return self.encoder.norm(x)

    def rate_tokens(self, rates: Tensor, previous: bool = False) -> Tensor:
        """The input of a pair of pump rates [..., 2] (levels, mL/h) -> [..., d]: the sum of one
        learned vector per level and drug ("embedding"), or an MLP of the rates scaled to 0..2
        ("continuous": nearby rates get nearby inputs, so a rate the data rarely holds borrows
        from its neighbours). `previous`: the history's rates set one step before, else the
        dynamics' actions; each has its own parameters."""
        rates = rates.long().clamp(0, RATE_MAX)
        if self.config.action_encoding == "embedding":
            embeds = self.prev_action_embed if previous else self.action_embed
            return sum(embed(rates[..., j]) for j, embed in enumerate(embeds))
        head = self.prev_action_in if previous else self.action_in
        return self._head(head, rates.to(self.root_in.weight.dtype) / RATE_SCALE)

    def unroll(self, memory: Tensor, memory_padding: Tensor, actions: Tensor) -> Tensor:
        """Latent states after each action pair: actions [B, k, 2] int (k <= K) -> [B, k, d],
        row j being s_{j+1}. Output j depends on actions 0..j only."""
        k = actions.shape[1]
        root = self.root_in(memory[:, -1]).unsqueeze(1)  # [B, 1, d]
        tokens = root + self.step.weight[:k] + self.rate_tokens(actions)
        return self.dynamics(tokens, memory, tgt_mask=causal_mask(k, tokens.device), memory_key_padding_mask=memory_padding)

    def unroll_candidates(self, memory: Tensor, memory_padding: Tensor, actions: Tensor) -> Tensor:
        """Latent states of C candidate action sequences per row, sharing the row's history:
        actions [B, C, k, 2] int -> [B, C, k, d], row [b, c, j] being s_{j+1} under candidate c.

        `self.dynamics` written out (norm_first layers, GELU; equal to `unroll` of each candidate
        on its own, tested): self-attention runs within each candidate's k tokens, and the
        cross-attention lets all C·k tokens of a row read the row's history, whose keys and values
        are projected once instead of C times. For planning: no dropout.
        """
        b, c, k, _ = actions.shape
        d, heads = self.config.d_model, self.config.n_heads
        root = self.root_in(memory[:, -1])[:, None, None]  # [B, 1, 1, d]
        x = (root + self.step.weight[:k] + self.rate_tokens(actions)).reshape(b * c, k, d)
        causal = torch.zeros(k, k, dtype=x.dtype, device=x.device).masked_fill_(causal_mask(k, x.device), -math.inf)
        keep = torch.zeros(memory_padding.shape, dtype=x.dtype, device=x.device).masked_fill_(memory_padding, -math.inf)
        keep = keep[:, None, None, :]  # [B, 1, 1, L+1]

        def split(t: Tensor, rows: int) -> Tensor:  # [rows, n, d] -> [rows, h, n, d/h]
            return t.view(rows, -1, heads, d // heads).transpose(1, 2)

        for layer in self.dynamics.layers:
            sa = layer.self_attn
            q, kk, v = onednn.linear(layer.norm1(x), sa.in_proj_weight, sa.in_proj_bias).chunk(3, dim=-1)
            out = F.scaled_dot_product_attention(split(q, b * c), split(kk, b * c), split(v, b * c), attn_mask=causal)
            x = x + onednn.linear(out.transpose(1, 2).reshape(b * c, k, d), sa.out_proj.weight, sa.out_proj.bias)
            ca = layer.multihead_attn
            w_q, w_kv = ca.in_proj_weight.split([d, 2 * d])
            b_q, b_kv = ca.in_proj_bias.split([d, 2 * d])
            q = onednn.linear(layer.norm2(x).view(b, c * k, d), w_q, b_q)
            kk, v = onednn.linear(memory, w_kv, b_kv).chunk(2, dim=-1)
            out = F.scaled_dot_product_attention(split(q, b), split(kk, b), split(v, b), attn_mask=keep)
            x = x + onednn.linear(out.transpose(1, 2).reshape(b, c * k, d), ca.out_proj.weight, ca.out_proj.bias).view(b * c, k, d)
            hidden = onednn.linear(layer.norm3(x), layer.linear1.weight, layer.linear1.bias, "gelu")
            x = x + onednn.linear(hidden, layer.linear2.weight, layer.linear2.bias)
        return self.dynamics.norm(x).view(b, c, k, d)

    def _head(self, head: nn.Sequential, states: Tensor) -> Tensor:
        """A `_mlp` head (Linear, GELU, Linear), its products through `onednn.linear`."""
        first, last = head[0], head[2]
        hidden = onednn.linear(states, first.weight, first.bias, "gelu")
        return onednn.linear(hidden, last.weight, last.bias)

    def policy_logits(self, states: Tensor) -> Tensor:
        """states [..., d] -> [..., 2, A]."""
        return self._head(self.policy_head, states).unflatten(-1, (N_DRUGS, RATE_LEVELS))

    def value(self, states: Tensor) -> Tensor:
        """states [..., d] -> [...] normalised value."""
        return self._head(self.value_head, states).squeeze(-1)

    def reward(self, states: Tensor) -> Tensor:
        """states [..., d] (s_{k+1}) -> [...] normalised reward of the action that led there."""
        return self._head(self.reward_head, states).squeeze(-1)

    def forward(self, history: Tensor, history_mask: Tensor, static: Tensor, actions: Tensor) -> PlannerOutput:
        """Unroll the dynamics with the given actions [B, K, 2] (the true ones in Stage 1)."""
        memory, padding = self.represent(history, history_mask, static)
        after = self.unroll(memory, padding, actions)  # [B, K, d] s_1..s_K
        states = torch.cat([memory[:, -1:], after], dim=1)  # [B, K+1, d]
        before = states[:, :-1]
        return PlannerOutput(
            policy_logits=self.policy_logits(before),
            value=self.value(before),
            reward=self.reward(after),
            bis_logits=self.bis_head(after),
            map_logits=self.map_head(after),
            states=states,
            memory=memory,
            memory_padding=padding,
        )

    def rollout_policy(self, memory: Tensor, memory_padding: Tensor, steps: int, detach_dynamics: bool = False) -> tuple[Tensor, Tensor]:
        """Unroll with the model's own argmax actions, each sample its own, one step at a time.

        Returns the states s_0..s_{steps-1} [B, steps, d] the policy is read from, and the
        actions taken [B, steps, 2]. With detach_dynamics the states carry no gradient.

        An argmax carries no gradient, so the actions are chosen step by step without one; the
        states are then ONE causal unroll of the chosen actions (its output j depends on actions
        0..j only): the gradient of unrolling each prefix again, at the cost of one unroll.
        """
        with torch.no_grad():
            actions = self.policy_logits(memory[:, -1]).argmax(-1).unsqueeze(1)  # [B, 1, 2]
            for _ in range(steps - 1):
                state = self.unroll(memory, memory_padding, actions)[:, -1]
                actions = torch.cat([actions, self.policy_logits(state).argmax(-1).unsqueeze(1)], dim=1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_dynamics):
            states = memory[:, -1:]
            if steps > 1:
                states = torch.cat([states, self.unroll(memory, memory_padding, actions[:, :-1])], dim=1)
            return states, actions

    @torch.no_grad()
    def act(self, history: Tensor, history_mask: Tensor, static: Tensor) -> Tensor:
        """Argmax rates at the current step: [B, 2] int64 levels 0..RATE_MAX."""
        memory, _ = self.represent(history, history_mask, static)
        return self.policy_logits(memory[:, -1]).argmax(-1)


def expected_class(logits: Tensor) -> Tensor:
    """Expected class index under softmax(logits) over the last axis: [..., C] -> [...]."""
    classes = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return logits.softmax(-1) @ classes
