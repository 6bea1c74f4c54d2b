"""LoRA files other tools load: diffusers/peft (`pipe.load_lora_weights`) and kohya (A1111, ComfyUI, sd-scripts).

Both carry the trained alpha. diffusers reads it from the LoraConfig stored as JSON in the safetensors
header (without it the loader assumes alpha = r); kohya files store it per module as a `.alpha` tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import torch
from safetensors.torch import save_file

from hyperfields.files import atomic_write
from hyperfields.lora import LoraFormat

FORMATS: tuple[str, ...] = get_args(LoraFormat)
# diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY; tests/test_export.py checks the two agree.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
UNET_PREFIX = "unet."
KOHYA_PREFIX = "lora_unet_"


@dataclass
class LoraWeights:
    """One UNet LoRA: factors by target, the trained alpha (scale = alpha / rank) and provenance for the header."""

    tensors: dict[str, torch.Tensor]  # "<module>.lora_A" (r, in) and "<module>.lora_B" (out, r), no batch dimension
    alpha: float
    metadata: dict[str, str] = field(default_factory=dict)  # written into the file header as is

    @property
    def targets(self) -> list[str]:
        """The UNet module names that carry a LoRA, in layout order."""
        return [name.removesuffix(".lora_A") for name in self.tensors if name.endswith(".lora_A")]

    @property
    def rank(self) -> int:
        return int(self.tensors[f"{self.targets[0]}.lora_A"].shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, target: str) -> torch.Tensor:
        """The weight update scale * B @ A (out, in) this LoRA adds to module `target`."""
        return self.scale * self.tensors[f"{target}.lora_B"].float() @ self.tensors[f"{target}.lora_A"].float()


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().contiguous().cpu()


def diffusers_state_dict(lora: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of a diffusers/peft LoRA file: `unet.<module>.lora_A.weight` / `.lora_B.weight`."""
    tensors = {}
    for target in lora.targets:
        tensors[f"{UNET_PREFIX}{target}.lora_A.weight"] = _cpu(lora.tensors[f"{target}.lora_A"])
        tensors[f"{UNET_PREFIX}{target}.lora_B.weight"] = _cpu(lora.tensors[f"{target}.lora_B"])
    # Whole module names as target_modules: peft matches them exactly, so no other layer gets a LoRA.
    config = {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": lora.targets}
    header = {**lora.metadata, ADAPTER_METADATA_KEY: json.dumps({UNET_PREFIX + k: v for k, v in config.items()}, sort_keys=True)}
    return tensors, header


def kohya_name(target: str) -> str:
    """kohya's name of a diffusers UNet module: sd-scripts trains SD 1.x/2.x on the diffusers UNet, dots become _."""
    return KOHYA_PREFIX + target.replace(".", "_")


def kohya_state_dict(lora: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of a kohya LoRA file: `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`."""
    tensors = {}
    for target in lora.targets:
        name = kohya_name(target)
        tensors[f"{name}.lora_down.weight"] = _cpu(lora.tensors[f"{target}.lora_A"])
        tensors[f"{name}.lora_up.weight"] = _cpu(lora.tensors[f"{target}.lora_B"])
        tensors[f"{name}.alpha"] = torch.tensor(float(lora.alpha))
    header = {**lora.metadata, "ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank),
              "ss_network_alpha": f"{lora.alpha:g}"}
    return tensors, header


def write_lora(lora: LoraWeights, path: Path, format: LoraFormat) -> Path:
    """`path`, holding `lora` as a safetensors file in `format`, written atomically."""
    if format == "diffusers":
        tensors, header = diffusers_state_dict(lora)
    elif format == "kohya":
        tensors, header = kohya_state_dict(lora)
    else:
        raise ValueError(f"unknown LoRA format {format!r}; expected one of {', '.join(FORMATS)}")
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata={"format": "pt", **header}))

