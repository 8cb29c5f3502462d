"""A GRPO update's samples as tensors, built once per step on the training device.

``RolloutBatch.build(samples, device)`` lays every sample's sequence (prompt + completion, less its last token) end
to end as flat tensors: token ids, positions restarting at 0 on each sample, and the targets (the completion tokens
the loss is computed on; tool answers are context, never targets) with the row position predicting each. Every
per-target tensor of the update (old, reference, sampler log-probs, correction weights) is laid out in this order.
``micro(indices)`` is the padding-free packed row of some samples, indexed out of those tensors. This module never
runs a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from posttrain.grpo.collect import Rollout


@dataclass
class MicroBatch:
    """The packed row of some samples of a ``RolloutBatch``; see the module docstring."""

    samples: torch.Tensor  # (S,) the samples' indices in the batch
    ids: torch.Tensor  # (1, L)
    positions: torch.Tensor  # (1, L) restarting at 0 on each sample
    target_pos: torch.Tensor  # (N,) the row positions predicting the targets
    targets: torch.Tensor  # (N,)
    seq_ids: torch.Tensor  # (N,) each target's sample, 0..S-1 within the row
    target_index: torch.Tensor  # (N,) the targets' places in the batch's per-target tensors


@dataclass
class RolloutBatch:
    """The samples of one update as flat tensors on one device; see the module docstring."""

    samples: list[Rollout]
    ids: torch.Tensor  # (T,) every sample's row, end to end
    positions: torch.Tensor  # (T,)
    token_sample: torch.Tensor  # (T,) the sample each token belongs to
    row_lengths: list[int]  # per sample: prompt + completion - 1 tokens
    num_trained: list[int]  # per sample: its targets
    targets: torch.Tensor  # (N,) the trained completion tokens
    target_local: torch.Tensor  # (N,) the position predicting each target within its sample's row
    target_sample: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (S,) float64
    sampler_logprobs: torch.Tensor  # (N,) float32

    @classmethod
    def build(cls, samples: Sequence[Rollout], device: torch.device | str) -> RolloutBatch:
        samples = list(samples)
        for i, s in enumerate(samples):
            if len(s.sampler_logprobs) != s.num_trained:
                raise ValueError(f"sample {i}: {len(s.sampler_logprobs)} sampler log-probs for {s.num_trained} "
                                 "trained completion tokens")
        row_lengths = [len(s.prompt_ids) + len(s.completion_ids) - 1 for s in samples]
        num_trained = [s.num_trained for s in samples]
        seqs = itertools.chain.from_iterable((s.prompt_ids + s.completion_ids)[:-1] for s in samples)
        ids = torch.tensor(list(seqs), dtype=torch.long, device=device)
        lengths = torch.tensor(row_lengths, dtype=torch.long, device=device)
        index = torch.arange(len(samples), device=device)
        token_sample = torch.repeat_interleave(index, lengths)
        row_start = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(ids.numel(), device=device) - row_start[token_sample]
        # the positions predicting the completion tokens, then those of the trained ones (tool answers left out)
        completion_lengths = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.long, device=device)
        completion_sample = torch.repeat_interleave(index, completion_lengths)
        completion_start = torch.cumsum(completion_lengths, 0) - completion_lengths
        prompt_lengths = torch.tensor([len(s.prompt_ids) for s in samples], dtype=torch.long, device=device)
        predicting = (prompt_lengths - 1)[completion_sample] + torch.arange(
            completion_sample.numel(), device=device) - completion_start[completion_sample]
        trained = torch.tensor([m for s in samples for m in (s.completion_mask or [1] * len(s.completion_ids))],
                               dtype=torch.bool, device=device)
        return cls(
            samples, ids, positions, token_sample, row_lengths, num_trained,
            targets=torch.tensor([t for s in samples for t in s.trained_ids], dtype=torch.long, device=device),
            target_local=predicting[trained], target_sample=completion_sample[trained],
            advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float64, device=device),
            sampler_logprobs=torch.tensor([lp for s in samples for lp in s.sampler_logprobs], dtype=torch.float32,
                                          device=device))

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def micro(self, indices: Sequence[int]) -> MicroBatch:
        """The packed row of the samples ``indices`` (ascending), in that order."""
        device = self.device
        samples = torch.tensor(list(indices), dtype=torch.long, device=device)
        tokens = torch.isin(self.token_sample, samples)
        target_index = torch.isin(self.target_sample, samples).nonzero().squeeze(1)
        lengths = torch.tensor([self.row_lengths[i] for i in indices], dtype=torch.long, device=device)
        trained = torch.tensor([self.num_trained[i] for i in indices], dtype=torch.long, device=device)
        row_start = torch.cumsum(lengths, 0) - lengths
        seq_ids = torch.repeat_interleave(torch.arange(len(indices), device=device), trained)
        return MicroBatch(samples, self.ids[tokens][None], self.positions[tokens][None],
                          self.target_local[target_index] + row_start[seq_ids], self.targets[target_index], seq_ids,
                          target_index)

    def per_sample(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A per-target tensor of this batch cut into its samples' parts."""
        return values.split(self.num_trained)
