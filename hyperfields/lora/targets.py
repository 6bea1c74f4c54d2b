"""Which linear layers of a model get LoRA weights, and the tensor shapes those weights take.

The layout returned by `lora_layout` is the contract between the hypernetwork (which emits one
tensor per key) and `hyperfields.lora.batched.BatchedLora` (which consumes them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from hyperfields.errors import UserError

_REGEX_PREFIX = "re:"


def _matches(name: str, pattern: str) -> bool:
    """Return whether module `name` is selected by `pattern` (dot-boundary suffix or `re:` fullmatch)."""
    if pattern.startswith(_REGEX_PREFIX):
        return re.fullmatch(pattern[len(_REGEX_PREFIX) :], name) is not None
    # A plain suffix test would let "to_q" select "add_to_q"; requiring a dot keeps whole name parts.
    return name == pattern or name.endswith("." + pattern)


def find_lora_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Return the qualified names of the `nn.Linear` modules of `model` matched by `patterns`, in module order.

    A pattern matches a name that equals it or ends with "." + pattern ("to_out.0" matches
    "...attn1.to_out.0"); a pattern starting with "re:" is a regular expression that must match the
    whole name (re.fullmatch). Raises UserError when nothing matches.
    """
    if isinstance(patterns, str):
        # A bare string would be iterated character by character and match nearly everything.
        patterns = [patterns]
    for pattern in patterns:
        if pattern.startswith(_REGEX_PREFIX):
            try:
                re.compile(pattern[len(_REGEX_PREFIX) :])
            except re.error as exc:
                raise UserError(f"LoRA target pattern {pattern!r} is not a valid regex: {exc}") from None

    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    targets = [name for name in linear_names if any(_matches(name, p) for p in patterns)]
    if not targets:
        examples = ", ".join(linear_names[:3]) or "(the model has no nn.Linear layers)"
        raise UserError(
            f"no LoRA target matches patterns {list(patterns)} in {type(model).__name__}; "
            f"linear layers look like: {examples}"
        )
    return targets


def lora_layout(model: nn.Module, targets: Sequence[str], rank: int) -> dict[str, tuple[int, ...]]:
    """Return the per-sample LoRA tensor shapes: "<t>.lora_A" -> (rank, in), "<t>.lora_B" -> (out, rank).

    Keys follow `targets` order, A before B for each target. A batch of n samples prepends n to
    each shape (see BatchedLora.set_weights).
    """
    if rank < 1:
        raise UserError(f"LoRA rank must be at least 1, got {rank}")
    layout: dict[str, tuple[int, ...]] = {}
    for name in targets:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"LoRA target {name!r} is not a module of {type(model).__name__}") from None
        # An already attached BatchedLoraLinear still exposes in/out features of its base layer.
        if not (isinstance(module, nn.Linear) or hasattr(module, "base_layer")):
            raise UserError(f"LoRA target {name!r} is a {type(module).__name__}, not nn.Linear")
        layout[f"{name}.lora_A"] = (rank, module.in_features)
        layout[f"{name}.lora_B"] = (module.out_features, rank)
    return layout


def layout_mismatch(layout: Mapping[str, Sequence[int]], model: nn.Module) -> str | None:
    """None when `model` has every target of `layout` with the same in/out features, else one line saying what differs.

    `layout` is a published LoRA layout ("<t>.lora_A" -> (r, in), "<t>.lora_B" -> (out, r)).
    """
    modules = dict(model.named_modules())
    targets = [name.removesuffix(".lora_A") for name in layout if name.endswith(".lora_A")]
    missing, differing = [], []
    for target in targets:
        module = modules.get(target)
        if module is None or not (isinstance(module, nn.Linear) or hasattr(module, "base_layer")):
            missing.append(target)
            continue
        expected = (layout[f"{target}.lora_B"][0], layout[f"{target}.lora_A"][1])  # (out, in)
        found = (module.out_features, module.in_features)
        if expected != found:
            differing.append(f"{target} is (out, in) = {found} here, {expected} in the layout")
    if not missing and not differing:
        return None
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} of {len(targets)} LoRA targets are not linear layers of this model (e.g. {missing[0]})"
        )
    if differing:
        parts.append(f"{len(differing)} of {len(targets)} have other shapes (e.g. {differing[0]})")
    return "; ".join(parts)
