"""Windows as torch tensors for the planner: inputs, Stage 1 targets (BIS, MAP, reward, value
at every unrolled step) and Stage 2 targets (the clinician's actions), served in whole
minibatches by index (no per-window collation)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from dosewise.data.windows import Windows


@dataclass
class WindowBatch:
    """Windows as tensors with the first axis W: the model's inputs, the Stage 1 targets and the
    Stage 2 targets. One record for the whole data set and for each minibatch (not frozen:
    Lightning moves a batch to its device by setting the fields)."""

    history: Tensor  # [W, L, F] float32
    history_mask: Tensor  # [W, L] bool, real steps right-aligned
    static: Tensor  # [W, S] float32
    actions: Tensor  # [W, K, 2] int64, the clinician's levels at the K unrolled steps
    target_bis: Tensor  # [W, K] int64, BIS class reached after each step
    target_map: Tensor  # [W, K] int64, MAP class reached after each step
    rewards: Tensor  # [W, K] float32
    values: Tensor  # [W, K] float32, G_{t+k}
    value_mask: Tensor  # [W, K] bool, where G_{t+k} is defined
    future_mask: Tensor  # [W, K] bool, where step t+k exists

    def __len__(self) -> int:
        return self.history.shape[0]

    def rows(self, index: Tensor | slice) -> WindowBatch:
        """The windows at `index` (positions or a slice), every field alike."""
        return WindowBatch(*(getattr(self, field.name)[index] for field in fields(self)))

    @property
    def inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(history, history_mask, static): what the model's representation reads."""
        return self.history, self.history_mask, self.static


def value_targets(windows: Windows, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Return G_{t+k} of every unrolled step k = 0..K-1 and where it is defined.

    G_{t} is `windows.returns`; G_{t+k} = (G_{t+k-1} - r_{k-1}) / gamma, r_{k-1} being the reward
    of reaching step t+k (for gamma = 0, G_{t+k} = r_k). Defined where step t+k+1 exists
    (future_mask). Returns values [W, K] float32 (0 where undefined) and mask [W, K] bool.
    """
    rewards = windows.rewards.astype(np.float64)
    k_steps = rewards.shape[1]
    values = np.zeros(rewards.shape, dtype=np.float64)
    values[:, 0] = windows.returns
    for k in range(1, k_steps):
        values[:, k] = rewards[:, k] if gamma == 0.0 else (values[:, k - 1] - rewards[:, k - 1]) / gamma
    mask = windows.future_mask.copy()
    return np.where(mask, values, 0.0).astype(np.float32), mask


def window_tensors(windows: Windows, gamma: float) -> WindowBatch:
    """All arrays the planner trains on, as one `WindowBatch`."""
    values, value_mask = value_targets(windows, gamma)
    return WindowBatch(
        history=torch.from_numpy(windows.history.astype(np.float32)),
        history_mask=torch.from_numpy(windows.history_mask),
        static=torch.from_numpy(windows.static.astype(np.float32)),
        actions=torch.from_numpy(windows.actions.astype(np.int64)),
        target_bis=torch.from_numpy(windows.target_bis.astype(np.int64)),
        target_map=torch.from_numpy(windows.target_map.astype(np.int64)),
        rewards=torch.from_numpy(windows.rewards.astype(np.float32)),
        values=torch.from_numpy(values),
        value_mask=torch.from_numpy(value_mask),
        future_mask=torch.from_numpy(windows.future_mask),
    )


class WindowBatches(Dataset):
    """A dataset indexed by lists of window positions: item [i, j, ...] is the whole batch."""

    def __init__(self, tensors: WindowBatch) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, index: list[int]) -> WindowBatch:
        return self.tensors.rows(torch.as_tensor(index, dtype=torch.long))


class RepeatedPasses(Sampler[list[int]]):
    """Each epoch, the same minibatches `passes` times in a row (the alternating strategy's env
    pass, then its policy pass, over one shuffle)."""

    def __init__(self, batches: BatchSampler, passes: int) -> None:
        self.batches, self.passes = batches, passes

    def __len__(self) -> int:
        return self.passes * len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        epoch = list(self.batches)
        for _ in range(self.passes):
            yield from epoch


def batch_loader(tensors: WindowBatch, batch_size: int, shuffle: bool, seed: int = 0, passes: int = 1, per_epoch: int = 0) -> DataLoader:
    """Minibatches of `batch_size` windows (the last one smaller), shuffled with `seed` per epoch;
    with per_epoch > 0 (and shuffle) each epoch draws that many windows afresh, without
    replacement; with passes > 1 each epoch serves its minibatches that many times over."""
    dataset = WindowBatches(tensors)
    generator = torch.Generator().manual_seed(seed)
    if shuffle:
        sampler = RandomSampler(dataset, num_samples=min(per_epoch, len(dataset)) or None, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    batches = BatchSampler(sampler, batch_size, drop_last=False)
    return DataLoader(dataset, sampler=RepeatedPasses(batches, passes) if passes > 1 else batches, batch_size=None)


def subsample(windows: Windows, limit: int, seed: int) -> Windows:
    """At most `limit` windows drawn without replacement (seeded, order kept); 0: all."""
    if limit == 0 or len(windows) <= limit:
        return windows
    keep = np.sort(np.random.default_rng(seed).choice(len(windows), limit, replace=False))
    return windows.select(keep)
