"""The planner's learned model as the search's model: root inference from the encoded history and
recurrent inference by incremental decoding (a key/value cache, one token per call), the
`RootOutput` / `RecurrentFn` that `mcts.search` expands."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dosewise import onednn
from dosewise.data.anesthesia import RATE_MAX
from dosewise.planner.mcts import RecurrentFn, RecurrentOutput, RootOutput
from dosewise.planner.model import PlannerModel


def planner_search_fns(
    model: PlannerModel, history: Tensor, history_mask: Tensor, static: Tensor, max_depth: int | None = None
) -> tuple[RootOutput, RecurrentFn]:
    """Root inference and recurrent inference of the planner on B windows: history [B, L, F],
    history_mask [B, L] bool, static [B, S] (as `PlannerModel.represent`), max_depth D (default
    model.pre_len; the search's config.max_depth must not exceed it). Encodes the history, then
    `planner_search_fns_from_memory`."""
    with torch.no_grad():
        memory, padding = model.represent(history, history_mask, static)
    return planner_search_fns_from_memory(model, memory, padding, max_depth)


class _TokenCache:
    """Self-attention keys and values of every token the dynamics decodes in one search.

    Slot-major, slots [layers, C, B, 2, h, d/h]: slot c holds the tokens of recurrent call c for
    all B rows (a call decodes one token per row). A node's embedded state lists the slots of its
    prefix's tokens, a page table (as vLLM's block tables), so the search stores and gathers D + 1
    numbers per node instead of the prefix's keys and values (2 · layers · D · d numbers: 33 MB of
    tree states at the default sizes, which pushed the history's keys and values out of the
    cache). Reserves `reserved` slots and doubles when a search makes more calls.
    """

    def __init__(self, layers: int, rows: int, heads: int, head_dim: int, reserved: int, like: Tensor) -> None:
        self.slots = like.new_empty(layers, reserved, rows, 2, heads, head_dim)
        self.used = 0

    def new_slot(self) -> int:
        if self.used == self.slots.shape[1]:
            self.slots = torch.cat([self.slots, torch.empty_like(self.slots)], dim=1)
        self.used += 1
        return self.used - 1

    def prefix(self, layer: int, flat: Tensor) -> Tensor:
        """Keys and values [B, D, 2, h, d/h] of the tokens at flat slot indices `flat` [B, D]
        (slot · B + row)."""
        slots = self.slots[layer, : self.used].flatten(0, 1)  # [used · B, 2, h, d/h]
        return slots.index_select(0, flat.flatten()).view(*flat.shape, *slots.shape[1:])


def planner_search_fns_from_memory(
    model: PlannerModel, memory: Tensor, memory_padding: Tensor, max_depth: int | None = None
) -> tuple[RootOutput, RecurrentFn]:
    """Root inference and recurrent inference of the planner from the encoded history
    (`PlannerModel.represent`: memory [B, L+1, d], memory_padding [B, L+1] bool), e.g. the one a
    training step has computed anyway (it is detached).

    The dynamics is a causal transformer decoder over the action prefix, run here one token at a
    time with a key/value cache (incremental decoding). The keys and values live in the
    recurrent_fn's own token cache (`_TokenCache`); a node's embedded state is its page table,
    state [B, D + 1] float: the cache slots of its prefix's tokens at depths 0..D-1 (entries at
    and beyond its depth unused), then its depth (exact as floats). A state is meaningful to the
    recurrent_fn that made it, and every recurrent_fn to one search: it keeps the tokens of all
    its calls. recurrent_fn adds the token of the action at the node's depth, attends to the
    cached prefix and to the encoded history (its keys and values projected once, here) and
    returns s_{depth+1}: the same latent state as `model.unroll` on the prefix (up to rounding;
    tested). Values and rewards are in units (`value_in_units`, `reward_in_units`). No
    gradients, no dropout (the model as in eval mode).
    """
    depth_max = model.pre_len if max_depth is None else max_depth
    if not 1 <= depth_max <= model.pre_len:
        raise ValueError(f"max_depth must be in 1..pre_len ({model.pre_len}), got {depth_max}")
    layers = model.dynamics.layers
    if not all(layer.norm_first for layer in layers):  # the decoding below is that of norm_first layers
        raise ValueError("planner_search_fns expects the dynamics' decoder layers to be norm_first")
    d, heads = model.config.d_model, model.config.n_heads
    head_dim = d // heads
    scale = 1.0 / math.sqrt(head_dim)  # as nn.MultiheadAttention
    b, keys = memory.shape[:2]
    with torch.no_grad():
        memory = memory.detach()
        root_latent = memory[:, -1]
        root_token = model.root_in(root_latent)  # [B, d]
        # Cross-attention keys [B·h, d/h, L+1] and values [B·h, L+1, d/h] of the encoded history.
        cross = []
        for layer in layers:
            attn = layer.multihead_attn
            kv = onednn.linear(memory, attn.in_proj_weight[d:], attn.in_proj_bias[d:])  # [B, L+1, 2d]
            k, v = kv.view(b, keys, 2, heads, head_dim).permute(2, 0, 3, 1, 4).reshape(2, b * heads, keys, head_dim)
            cross.append((k.transpose(1, 2).contiguous(), v.contiguous()))
        memory_mask = torch.zeros(b, heads, 1, keys, dtype=memory.dtype, device=memory.device)
        memory_mask = memory_mask.masked_fill(memory_padding.view(b, 1, 1, keys), -math.inf).view(b * heads, 1, keys)
        root = RootOutput(
            prior_logits=model.policy_logits(root_latent),
            value=model.value_in_units(model.value(root_latent)),
            state=memory.new_zeros(b, depth_max + 1),
        )
    # Row d: 0 for the prefix positions a token at depth d attends to, -inf after it; [D, D, 1].
    positions = torch.arange(depth_max, device=memory.device)
    later_at_depth = torch.zeros(depth_max, depth_max, 1, dtype=memory.dtype, device=memory.device)
    later_at_depth.masked_fill_((positions.unsqueeze(1) < positions).unsqueeze(-1), -math.inf)
    rows_at = torch.arange(b, device=memory.device).unsqueeze(1)  # [B, 1]
    tokens = _TokenCache(len(layers), b, heads, head_dim, reserved=64, like=memory)

    def recurrent_fn(state: Tensor, action: Tensor) -> RecurrentOutput:
        with torch.no_grad():
            depth = state[:, -1].long()  # [B]
            slot = tokens.new_slot()
            next_state = state.clone()  # the child's page table: the parent's plus this token's slot
            next_state.scatter_(1, depth.unsqueeze(1), float(slot))
            next_state[:, -1] += 1
            flat = next_state[:, :-1].long() * b + rows_at  # [B, D] flat slots of the prefix
            action = action.long().clamp(0, RATE_MAX)
            x = root_token + model.step.weight.index_select(0, depth)
            x = x + model.rate_tokens(action)  # [B, d]
            later = later_at_depth.index_select(0, depth)  # [B, D, 1] -inf after the new token
            for i, layer in enumerate(layers):
                # Causal self-attention: the new token against the cached prefix and itself.
                attn = layer.self_attn
                qkv = onednn.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).view(b, 3, heads, head_dim)
                tokens.slots[i, slot] = qkv[:, 1:]
                k, v = tokens.prefix(i, flat).unbind(2)  # [B, D, h, d/h] each
                weights = ((qkv[:, :1] * k).sum(-1) * scale + later).softmax(1)  # [B, D, h]
                out = (weights.unsqueeze(-1) * v).sum(1)  # [B, h, d/h]
                x = x + onednn.linear(out.reshape(b, d), attn.out_proj.weight, attn.out_proj.bias)
                # Cross-attention to the encoded history.
                attn = layer.multihead_attn
                q = onednn.linear(layer.norm2(x), attn.in_proj_weight[:d], attn.in_proj_bias[:d])
                q = q.view(b * heads, 1, head_dim)
                weights = torch.baddbmm(memory_mask, q, cross[i][0], alpha=scale).softmax(-1)  # [B·h, 1, L+1]
                x = x + onednn.linear(torch.bmm(weights, cross[i][1]).view(b, d), attn.out_proj.weight, attn.out_proj.bias)
                ff = onednn.linear(layer.norm3(x), layer.linear1.weight, layer.linear1.bias, "gelu")
                x = x + onednn.linear(ff, layer.linear2.weight, layer.linear2.bias)
            latent = model.dynamics.norm(x)  # [B, d] s_{depth+1}
            return RecurrentOutput(
                reward=model.reward_in_units(model.reward(latent)),
                value=model.value_in_units(model.value(latent)),
                prior_logits=model.policy_logits(latent),
                state=next_state,
            )

    return root, recurrent_fn
