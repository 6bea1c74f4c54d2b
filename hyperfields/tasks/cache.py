"""Per-image cache of what a training step computes from a condition that never changes.

A condition's VAE latents, text embeddings and frozen-encoder tokens are deterministic functions of the
image and its caption (the latent is the posterior mean, the data has no augmentation), so computing them
once per image and reusing them gives the same loss as computing them at every step, without the VAE,
text encoders or image encoder in the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    """`tree` with `fn` applied to every tensor in it: tensors, None, tuples, dicts and dataclasses of them."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if tree is None:
        return None
    if isinstance(tree, tuple):
        return tuple(map_tensors(fn, item) for item in tree)
    if isinstance(tree, dict):
        return {key: map_tensors(fn, value) for key, value in tree.items()}
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{f.name: map_tensors(fn, getattr(tree, f.name)) for f in dataclasses.fields(tree)})
    raise TypeError(f"cannot cache a {type(tree).__name__}: expected tensors, tuples, dicts or dataclasses of them")


def concat_rows(trees: Sequence[Any]) -> Any:
    """One tree whose tensors are the row-wise concatenation of the same tensors in `trees` (same structure)."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(trees), dim=0)
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(concat_rows([tree[i] for tree in trees]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: concat_rows([tree[key] for tree in trees]) for key in first}
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: concat_rows([getattr(tree, f.name) for tree in trees]) for f in dataclasses.fields(first)})
    raise TypeError(f"cannot cache a {type(first).__name__}: expected tensors, tuples, dicts or dataclasses of them")


class ConditionCache:
    """Gives `compute(indices)` for any list of dataset indices, each index computed once and kept in CPU memory.

    `compute` returns a batch (tensors with one row per index, in any tree `map_tensors` accepts); the cache
    stores each row on its first use, so the cost spreads over the first epoch and each process only holds the
    images it drew.
    """

    def __init__(self, compute: Callable[[list[int]], Any], device: torch.device) -> None:
        self.compute = compute
        self.device = device
        self.rows: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, indices: Sequence[int]) -> Any:
        missing = sorted(set(indices) - self.rows.keys())
        if missing:
            with torch.no_grad():
                batch = self.compute(missing)
            for row, index in enumerate(missing):
                # A copy, not a view: a view would keep the whole batch's storage alive.
                self.rows[index] = map_tensors(lambda t: t[row : row + 1].detach().to("cpu", copy=True), batch)
        return map_tensors(lambda t: t.to(self.device), concat_rows([self.rows[i] for i in indices]))
