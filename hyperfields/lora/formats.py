"""LoRA files other tools load: diffusers/peft (`pipe.load_lora_weights`) and kohya (A1111, ComfyUI, sd-scripts).

Both carry the trained alpha. diffusers reads it from the LoraConfig stored as JSON in the safetensors
header (without it the loader assumes alpha = r); kohya files store it per module as a `.alpha` tensor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import torch
from safetensors.torch import save_file

from hyperfields.errors import UserError
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
    sdxl_layers_per_block: int | None = None  # set for an SDXL UNet: kohya files then use the SGM names

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


# sd-scripts trains SDXL on the original Stability (SGM) UNet, so SDXL kohya files name its modules, not diffusers'.
_SGM_EMBEDDINGS = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                   "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_SGM_RESNET = {"time_emb_proj": "emb_layers.1", "conv1": "in_layers.2", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_DIFFUSERS_BLOCK = re.compile(r"(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?(attentions|resnets)\.(\d+)\.(.+)")


def sgm_unet_name(target: str, layers_per_block: int = 2) -> str:
    """The SGM UNet's name of a diffusers SDXL UNet module ("down_blocks.1.attentions.0.x" -> "input_blocks.4.1.x").

    Down block i, layer j is input block (L+1)i + j + 1 (input block 0 is conv_in, each down block ends with its
    downsampler); up block i, layer j is output block (L+1)i + j; in each, part 0 is the resnet and part 1 the
    attention; the middle block is resnet, attention, resnet. L = layers_per_block (2 for SDXL).
    """
    if target in _SGM_EMBEDDINGS:
        return _SGM_EMBEDDINGS[target]
    match = _DIFFUSERS_BLOCK.fullmatch(target)
    if match is None:
        raise UserError(f"LoRA target {target!r} has no SDXL kohya name: only attention, resnet and embedding layers map")
    kind, block, inner, layer, rest = match.groups()
    if inner == "resnets":
        head, dot, tail = rest.partition(".")
        if head not in _SGM_RESNET:
            raise UserError(f"LoRA target {target!r} has no SDXL kohya name: resnet layer {head!r} is not one of {', '.join(_SGM_RESNET)}")
        rest = _SGM_RESNET[head] + dot + tail
    part = 0 if inner == "resnets" else 1
    if kind == "down_blocks":
        return f"input_blocks.{(layers_per_block + 1) * int(block) + int(layer) + 1}.{part}.{rest}"
    if kind == "up_blocks":
        return f"output_blocks.{(layers_per_block + 1) * int(block) + int(layer)}.{part}.{rest}"
    return f"middle_block.{2 * int(layer) if inner == 'resnets' else 1}.{rest}"


def kohya_name_sdxl(target: str, layers_per_block: int = 2) -> str:
    """kohya's name of a diffusers SDXL UNet module: lora_unet_ + its SGM name, dots become _."""
    return KOHYA_PREFIX + sgm_unet_name(target, layers_per_block).replace(".", "_")


def kohya_state_dict(lora: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of a kohya LoRA file: `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`."""
    tensors = {}
    for target in lora.targets:
        name = kohya_name(target) if lora.sdxl_layers_per_block is None else kohya_name_sdxl(target, lora.sdxl_layers_per_block)
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

