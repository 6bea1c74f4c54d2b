"""Per-image cache of what a training step computes from a condition that never changes.

A condition's VAE latents, text embeddings and frozen-encoder tokens are deterministic functions of the
image and its caption (the latent is the posterior mean, the data has no augmentation), so computing them
once per image and reusing them gives the same loss as computing them at every step, without the VAE,
text encoders or image encoder in the step. They are kept in each process's memory (`train.cache=memory`) or in
safetensors files shared by every process and every later run (`train.cache=disk`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import hyperfields
from hyperfields.config import Config
from hyperfields.data import ImageRecord
from hyperfields.files import atomic_write


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
        return dataclasses.replace(
            tree, **{f.name: map_tensors(fn, getattr(tree, f.name)) for f in dataclasses.fields(tree)}
        )
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
        return dataclasses.replace(
            first, **{f.name: concat_rows([getattr(tree, f.name) for tree in trees]) for f in dataclasses.fields(first)}
        )
    raise TypeError(f"cannot cache a {type(first).__name__}: expected tensors, tuples, dicts or dataclasses of them")


def flatten_tree(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(structure as JSON-able data, {name: tensor}) for a tree `map_tensors` accepts; `unflatten_tree` inverts it."""
    if isinstance(tree, torch.Tensor):
        return {"tensor": prefix}, {prefix: tree.contiguous()}
    if tree is None:
        return None, {}
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(tree, tuple):
        items = []
        for i, item in enumerate(tree):
            spec, found = flatten_tree(item, f"{prefix}{i}.")
            items.append(spec)
            tensors.update(found)
        return {"tuple": items}, tensors
    if isinstance(tree, dict):
        fields = dict(tree)
        kind: dict[str, Any] = {}
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        fields = {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
        kind = {"dataclass": f"{type(tree).__module__}:{type(tree).__qualname__}"}
    else:
        raise TypeError(f"cannot cache a {type(tree).__name__}: expected tensors, tuples, dicts or dataclasses of them")
    specs = {}
    for name, value in fields.items():
        specs[name], found = flatten_tree(value, f"{prefix}{name}.")
        tensors.update(found)
    return {**kind, "fields": specs}, tensors


def unflatten_tree(spec: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The tree `flatten_tree` took apart into `spec` and `tensors`."""
    if spec is None:
        return None
    if "tensor" in spec:
        return tensors[spec["tensor"]]
    if "tuple" in spec:
        return tuple(unflatten_tree(item, tensors) for item in spec["tuple"])
    fields = {name: unflatten_tree(value, tensors) for name, value in spec["fields"].items()}
    if "dataclass" not in spec:
        return fields
    module, _, name = spec["dataclass"].partition(":")
    if not module.startswith("hyperfields."):  # a cache file never names code outside this package
        raise ValueError(f"cached tree names {spec['dataclass']!r}, not a hyperfields class")
    kind = getattr(importlib.import_module(module), name)
    if not dataclasses.is_dataclass(kind):
        raise ValueError(f"cached tree names {spec['dataclass']!r}, not a dataclass")
    return kind(**fields)


class RowStore(Protocol):
    def load(self, index: int) -> Any | None: ...

    def keep(self, index: int, row: Any) -> None: ...


class MemoryRows(dict):
    """Rows by dataset index in this process's CPU memory."""

    def load(self, index: int) -> Any | None:
        return self.get(index)

    def keep(self, index: int, row: Any) -> None:
        self[index] = row


def condition_identity(config: Config) -> str:
    """What besides the image and caption decides a cached row: the frozen models, their precision, this version."""
    model = config.model
    return json.dumps(
        {
            "task": model.task,
            "base_model": model.base_model,
            "encoder": model.encoder,
            "train_encoder": model.train_encoder,
            "resolution": model.resolution,
            "dtype": config.train.frozen_dtype,
            "hyperfields": hyperfields.__version__,
        },
        sort_keys=True,
    )


class DiskRows:
    """Rows as one safetensors file each under `folder`, named by a hash of the image bytes, caption and models.

    Files are written under a temporary name and renamed, so processes computing the same row at once never
    leave a half-written file; they are read through safe_open's memory map, so memory does not grow with the
    dataset. Only each image's hash is kept per index.
    """

    def __init__(self, folder: Path, records: Sequence[ImageRecord], identity: str) -> None:
        self.folder = Path(folder)
        self.records = records
        self.identity = identity
        self.keys: dict[int, str] = {}

    def path(self, index: int) -> Path:
        if index not in self.keys:
            record = self.records[index]
            digest = hashlib.sha256(f"{self.identity}\0{record.caption}\0".encode())
            with open(record.path, "rb") as image:
                digest.update(image.read())
            self.keys[index] = digest.hexdigest()
        key = self.keys[index]
        return self.folder / key[:2] / f"{key}.safetensors"  # 256 subfolders keep directories small at 100k images

    def load(self, index: int) -> Any | None:
        path = self.path(index)
        try:
            with safe_open(str(path), framework="pt") as entry:
                spec = json.loads(entry.metadata()["tree"])
                return unflatten_tree(spec, {name: entry.get_tensor(name) for name in entry.keys()})
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # a damaged or foreign file is computed again and replaced

    def keep(self, index: int, row: Any) -> None:
        spec, tensors = flatten_tree(row)
        metadata = {"tree": json.dumps(spec), "identity": self.identity}
        atomic_write(self.path(index), lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


class ConditionCache:
    """Gives `compute(indices)` for any list of dataset indices, each index computed once and then read from `store`.

    `compute` returns a batch (tensors with one row per index, in any tree `map_tensors` accepts); the cache
    stores each row on its first use, so the cost spreads over the first epoch and each process only computes the
    images it drew. The default store is this process's memory.
    """

    def __init__(
        self, compute: Callable[[list[int]], Any], device: torch.device, store: RowStore | None = None
    ) -> None:
        self.compute = compute
        self.device = device
        self.store = store if store is not None else MemoryRows()

    def __len__(self) -> int:
        return len(self.store)

    def get(self, indices: Sequence[int]) -> Any:
        rows = {index: self.store.load(index) for index in dict.fromkeys(indices)}
        missing = sorted(index for index, row in rows.items() if row is None)
        if missing:
            with torch.no_grad():
                batch = self.compute(missing)
            for position, index in enumerate(missing):
                # A copy, not a view: a view would keep the whole batch's storage alive.
                rows[index] = map_tensors(lambda t, at=position: t[at : at + 1].detach().to("cpu", copy=True), batch)
                self.store.keep(index, rows[index])
        return map_tensors(lambda t: t.to(self.device), concat_rows([rows[i] for i in indices]))


def condition_cache(
    config: Config,
    compute: Callable[[list[int]], Any],
    device: torch.device,
    records: Sequence[ImageRecord],
    output: Path,
    note: Callable[[str], None],
) -> ConditionCache | None:
    """The cache `config.train.cache` asks for over `records` (None for "none"); the disk one under train.cache_dir."""
    train = config.train
    if train.cache_latents:
        note("note: train.cache_latents is deprecated and will be removed; use train.cache=memory")
    if train.cache == "none":
        return None
    if train.cache == "memory":
        return ConditionCache(compute, device)
    folder = Path(train.cache_dir) if train.cache_dir else Path(output) / "cache"
    return ConditionCache(compute, device, DiskRows(folder, records, condition_identity(config)))
