"""Per-sample LoRA: every sample of a batch gets its own LoRA weights within one model forward.

For sample i:  y = W x + b + scale * B_i (A_i x), computed with batched matmuls, no loop over samples.
The weights are plain tensors set from outside (e.g. a hypernetwork's output), so gradients flow
back to whatever produced them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from hyperfields.errors import UserError


class BatchedLoraLinear(nn.Module):
    """Gives an nn.Linear whose output adds a per-sample low-rank term when `lora_A`/`lora_B` are set.

    `lora_A` has shape (n, r, in) and `lora_B` (n, out, r). The input x has shape (N, ..., in)
    with N == k * n for some integer k >= 1; row j of x uses the weights of sample j // k, i.e. the
    same as repeating the weights with `repeat_interleave(k, dim=0)`. So k consecutive rows share a
    sample's weights (e.g. several noise draws of one sample stacked next to each other). A
    classifier-free-guidance batch built as cat([uncond, cond]) has the other order (row j ->
    sample j % n) and needs its weights repeated by the caller instead.
    """

    def __init__(self, base_layer: nn.Linear, scale: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        # Remember the caller's flags so detaching gives back the layer exactly as it was.
        self._base_requires_grad = [p.requires_grad for p in base_layer.parameters()]
        base_layer.requires_grad_(False)
        self.scale: float = float(scale)
        # Plain attributes, not Parameters/buffers: they belong to the producer's autograd graph.
        self.lora_A: Tensor | None = None
        self.lora_B: Tensor | None = None

    # Some diffusers processors read attn.to_q.weight (e.g. for dtype), so mirror the base layer.
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        """Return base_layer(x) plus, if weights are set, scale * B_i A_i x for each sample's rows."""
        out = self.base_layer(x)
        if self.lora_A is None or self.lora_B is None:
            return out
        n = self.lora_A.shape[0]
        if x.ndim < 2 or x.shape[0] % n != 0:
            raise ValueError(
                f"BatchedLoraLinear: input batch {tuple(x.shape)} is not a multiple of the {n} LoRA samples"
            )
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        # Rows j*k..j*k+k-1 are contiguous in memory order, so folding them (and all inner dims)
        # into one group per sample gives repeat_interleave semantics without copying weights.
        xs = x.reshape(n, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
        return out + self.scale * delta.reshape(out.shape).to(out.dtype)

    def extra_repr(self) -> str:
        rank = None if self.lora_A is None else self.lora_A.shape[1]
        return f"scale={self.scale}, rank={rank}"


class BatchedLora:
    """Gives control over the per-sample LoRA layers attached to one model: set, clear, detach.

    Use `BatchedLora.attach(...)`; as a context manager it detaches on exit.
    """

    def __init__(self, model: nn.Module, layers: dict[str, BatchedLoraLinear]) -> None:
        self.model = model
        self.layers = layers
        self._inside: dict[int, list[BatchedLoraLinear]] = {}  # id(checkpointed block) -> its LoRA layers

    @classmethod
    def attach(cls, model: nn.Module, targets: Sequence[str], scale: float) -> BatchedLora:
        """Return a BatchedLora after replacing each target nn.Linear of `model` in place by a BatchedLoraLinear."""
        layers: dict[str, BatchedLoraLinear] = {}
        for name in targets:
            if name in layers:
                raise UserError(f"LoRA target {name!r} is listed twice")
            parent_name, _, child = name.rpartition(".")
            try:
                parent = model.get_submodule(parent_name)
                module = getattr(parent, child)
            except AttributeError:
                raise UserError(f"LoRA target {name!r} is not a module of {type(model).__name__}") from None
            if isinstance(module, BatchedLoraLinear):
                raise UserError(f"LoRA target {name!r} already has a batched LoRA attached")
            if not isinstance(module, nn.Linear):
                raise UserError(f"LoRA target {name!r} is a {type(module).__name__}, not nn.Linear")
            layers[name] = BatchedLoraLinear(module, scale)
        # Swap only after every target checked out, so a bad name leaves the model untouched.
        for name, layer in layers.items():
            parent_name, _, child = name.rpartition(".")
            # nn.Module.__setattr__ also works for ModuleList children such as "to_out" / "0".
            setattr(model.get_submodule(parent_name), child, layer)
        return cls(model, layers)

    def set_weights(self, weights: Mapping[str, Tensor]) -> None:
        """Set every layer's per-sample weights from "<target>.lora_A" (n, r, in) / "<target>.lora_B" (n, out, r)."""
        expected = {f"{t}.lora_{ab}" for t in self.layers for ab in "AB"}
        unknown = sorted(set(weights) - expected)
        if unknown:
            raise ValueError(f"LoRA weights: unexpected key {unknown[0]!r} (not an attached target)")
        n: int | None = None
        checked: dict[str, tuple[Tensor, Tensor]] = {}
        for name, layer in self.layers.items():
            key_a, key_b = f"{name}.lora_A", f"{name}.lora_B"
            for key in (key_a, key_b):
                if key not in weights:
                    raise ValueError(f"LoRA weights: missing key {key!r}")
            a, b = weights[key_a], weights[key_b]
            if a.ndim != 3 or a.shape[2] != layer.in_features:
                raise ValueError(
                    f"LoRA weights: {key_a!r} has shape {tuple(a.shape)}, expected (n, r, {layer.in_features})"
                )
            if b.ndim != 3 or b.shape[1] != layer.out_features or b.shape[2] != a.shape[1] or b.shape[0] != a.shape[0]:
                raise ValueError(
                    f"LoRA weights: {key_b!r} has shape {tuple(b.shape)}, "
                    f"expected ({a.shape[0]}, {layer.out_features}, {a.shape[1]})"
                )
            # One sample count for the whole model, else layers would disagree about which row is which.
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"LoRA weights: {key_a!r} has {a.shape[0]} samples, other targets have {n}")
            checked[name] = (a, b)
        # Assign only after all checks so a bad mapping never leaves a half-updated model.
        for name, (a, b) in checked.items():
            self.layers[name].lora_A, self.layers[name].lora_B = a, b

    def clear(self) -> None:
        """Drop all LoRA weights; the model then computes its base outputs."""
        for layer in self.layers.values():
            layer.lora_A = layer.lora_B = None

    def checkpoint(self, block: Callable[..., Any], *args: Any) -> Any:
        """Gives block(*args) under activation checkpointing, its backward recomputation seeing the weights set now.

        A diffusers `gradient_checkpointing_func`. The weights are plain attributes, cleared once the model's
        forward returns, but backward recomputes each checkpointed block later: the recomputation puts the same
        tensors back for its duration, so it saves what the forward saved and gradients reach the weights.
        """
        if isinstance(block, nn.Module):
            if id(block) not in self._inside:
                self._inside[id(block)] = [m for m in block.modules() if isinstance(m, BatchedLoraLinear)]
            layers = self._inside[id(block)]
        else:
            layers = list(self.layers.values())
        weights = [(layer.lora_A, layer.lora_B) for layer in layers]
        return torch.utils.checkpoint.checkpoint(
            block,
            *args,
            use_reentrant=False,
            context_fn=lambda: (nullcontext(), _weights_set(layers, weights)),
        )

    def detach(self) -> None:
        """Put the original nn.Linear modules (and their requires_grad flags) back into the model."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, layer.base_layer)
            for p, flag in zip(layer.base_layer.parameters(), layer._base_requires_grad):
                p.requires_grad_(flag)
        self.layers = {}
        self._inside = {}

    def __enter__(self) -> BatchedLora:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


@contextmanager
def _weights_set(layers: list[BatchedLoraLinear], weights: list[tuple[Tensor | None, Tensor | None]]) -> Iterator[None]:
    before = [(layer.lora_A, layer.lora_B) for layer in layers]
    for layer, (a, b) in zip(layers, weights):
        layer.lora_A, layer.lora_B = a, b
    try:
        yield
    finally:
        for layer, (a, b) in zip(layers, before):
            layer.lora_A, layer.lora_B = a, b
