"""LoRA files other tools load: diffusers/peft (`pipe.load_lora_weights`) and kohya (A1111, ComfyUI, Forge, sd-scripts).

Both carry the trained alpha. diffusers reads it from the LoraConfig stored as JSON in the safetensors
header (without it the loader assumes alpha = r); kohya files store it per module as a `.alpha` tensor.
Both carry the ModelSpec keys (`modelspec.*`) that say which base model the LoRA is for; kohya files also carry
the `ss_*` keys sd-scripts writes, which A1111 reads to file a LoRA under SD 1.x, SD 2.x or SDXL.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import get_args

import torch
from safetensors.torch import save_file

from hyperfields.errors import UserError
from hyperfields.files import atomic_write
from hyperfields.lora import LoraFormat, LoraPrecision
from hyperfields.lora.families import BaseModelFamily
from hyperfields.lora.flux_layout import flux_kohya_modules

FORMATS: tuple[str, ...] = get_args(LoraFormat)
DTYPES: dict[LoraPrecision, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY; tests/test_export.py checks the two agree.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
KOHYA_PREFIX = "lora_unet_"


@dataclass(frozen=True)
class LoraOrigin:
    """What a LoRA was trained for and with, in the terms other tools file LoRAs by."""

    base_model: str  # the base model's hub id or folder
    family: BaseModelFamily
    resolution: int  # side of the square training images, in pixels
    trigger_phrase: str  # what a prompt says to bring in the subject


@dataclass
class LoraWeights:
    """One LoRA of a UNet or a transformer: factors by target, the trained alpha (scale = alpha / rank) and provenance
    for the header."""

    tensors: dict[str, torch.Tensor]  # "<module>.lora_A" (r, in) and "<module>.lora_B" (out, r), no batch dimension
    alpha: float
    metadata: dict[str, str] = field(default_factory=dict)  # written into the file header as is
    sdxl_layers_per_block: int | None = None  # set for an SDXL UNet: kohya files then use the SGM names
    component: str = "unet"  # the pipeline component the targets are modules of: "unet", or "transformer" (FLUX, SD3)

    @property
    def targets(self) -> list[str]:
        """The module names that carry a LoRA, in layout order."""
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


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Rounded once from float32, the precision the field predicts in.
    return tensor.detach().float().to(dtype).contiguous().cpu()


def diffusers_state_dict(
    lora: LoraWeights,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of a diffusers/peft LoRA file: `unet.<module>.lora_A.weight` / `.lora_B.weight`
    (`transformer.` for a FLUX or SD3 LoRA)."""
    prefix = f"{lora.component}."
    tensors = {}
    for target in lora.targets:
        tensors[f"{prefix}{target}.lora_A.weight"] = _stored(lora.tensors[f"{target}.lora_A"], dtype)
        tensors[f"{prefix}{target}.lora_B.weight"] = _stored(lora.tensors[f"{target}.lora_B"], dtype)
    # Whole module names as target_modules: peft matches them exactly, so no other layer gets a LoRA.
    config = {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": lora.targets}
    header = {
        **lora.metadata,
        ADAPTER_METADATA_KEY: json.dumps({prefix + k: v for k, v in config.items()}, sort_keys=True),
    }
    return tensors, header


def kohya_name(target: str) -> str:
    """kohya's name of a diffusers UNet module: sd-scripts trains SD 1.x/2.x on the diffusers UNet, dots become _."""
    return KOHYA_PREFIX + target.replace(".", "_")


# sd-scripts trains SDXL on the original Stability (SGM) UNet, so SDXL kohya files name its modules, not diffusers'.
_SGM_EMBEDDINGS = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_SGM_RESNET = {
    "time_emb_proj": "emb_layers.1",
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
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
        raise UserError(
            f"LoRA target {target!r} has no SDXL kohya name: only attention, resnet and embedding layers map"
        )
    kind, block, inner, layer, rest = match.groups()
    if inner == "resnets":
        head, dot, tail = rest.partition(".")
        if head not in _SGM_RESNET:
            known = ", ".join(_SGM_RESNET)
            raise UserError(
                f"LoRA target {target!r} has no SDXL kohya name: resnet layer {head!r} is not one of {known}"
            )
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


def kohya_modules(lora: LoraWeights, flux: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{kohya module name: (lora_down, lora_up, alpha)} of `lora`: the diffusers UNet's or SDXL's SGM names, or for a
    FLUX.1 LoRA (`flux`) the original model's fused layers."""
    if lora.component != "unet":
        if not flux:
            raise UserError(
                f"kohya files are written for UNet and FLUX.1 LoRAs, not this {lora.component} LoRA; write diffusers"
            )
        return flux_kohya_modules(lora.tensors, lora.targets, lora.alpha)
    modules = {}
    for target in lora.targets:
        name = (
            kohya_name(target)
            if lora.sdxl_layers_per_block is None
            else kohya_name_sdxl(target, lora.sdxl_layers_per_block)
        )
        modules[name] = (lora.tensors[f"{target}.lora_A"], lora.tensors[f"{target}.lora_B"], float(lora.alpha))
    return modules


def kohya_state_dict(
    lora: LoraWeights,
    dtype: torch.dtype = torch.float32,
    flux: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a kohya LoRA file: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    tensors = {}
    for name, (down, up, alpha) in kohya_modules(lora, flux).items():
        tensors[f"{name}.lora_down.weight"] = _stored(down, dtype)
        tensors[f"{name}.lora_up.weight"] = _stored(up, dtype)
        # A scalar kept in float32 whatever the precision, so the scale stays exact; loaders read it with .item().
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    # sd-scripts writes every value with str(): alpha as a float ("8.0"), dim as an int.
    header = {
        **lora.metadata,
        "ss_network_module": "networks.lora_flux" if flux else "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(float(lora.alpha)),
    }
    return tensors, header


# ModelSpec's implementation: whose module names the file's keys are. sd-scripts names SDXL modules by the SGM UNet.
IMPLEMENTATION_DIFFUSERS = "diffusers"
IMPLEMENTATION_SGM = "https://github.com/Stability-AI/generative-models"
IMPLEMENTATION_FLUX = "https://github.com/black-forest-labs/flux"


def modelspec_header(origin: LoraOrigin, title: str, implementation: str) -> dict[str, str]:
    """The ModelSpec (`modelspec.*`) keys of a LoRA file, with the values sd-scripts writes."""
    side = origin.resolution
    header = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": origin.family.architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.prediction_type": "v" if origin.family.v_prediction else "epsilon",
        "modelspec.date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "modelspec.trigger_phrase": origin.trigger_phrase,
    }
    if origin.family.transformer.startswith("flux-1"):  # sd-scripts writes no prediction type for FLUX
        del header["modelspec.prediction_type"]
    return header


def kohya_training_header(origin: LoraOrigin, output_name: str) -> dict[str, str]:
    """The `ss_*` keys sd-scripts writes about the training run that A1111 and LoRA managers read, as it writes them."""
    side = origin.resolution
    local = Path(origin.base_model).expanduser()
    return {
        "ss_base_model_version": origin.family.base_model_version,  # A1111: "sdxl_" -> SDXL
        "ss_v2": str(origin.family.v2),  # A1111: "True" -> SD 2.x, else SD 1.x
        "ss_output_name": output_name,
        "ss_resolution": str((side, side)),
        "ss_sd_model_name": local.name if local.exists() else origin.base_model,  # a folder by its name, as sd-scripts
        # One photo captioned with the trigger phrase, filed as sd-scripts files a DreamBooth folder: {"<repeats>_<class
        # tokens>": {tag: count}}, tags lower-cased; LoRA managers offer its most frequent tags as trigger words.
        "ss_tag_frequency": json.dumps({f"1_{origin.trigger_phrase}": {origin.trigger_phrase.lower(): 1}}),
    }


def write_lora(
    lora: LoraWeights,
    path: Path,
    format: LoraFormat,
    precision: LoraPrecision = "fp32",
    origin: LoraOrigin | None = None,
) -> Path:
    """`path`, holding `lora` as a safetensors file in `format` and `precision`, written atomically.

    With `origin` the header also says which base model the LoRA is for and how to trigger it (ModelSpec keys, and
    in a kohya file sd-scripts' keys), under the title of the file's name.
    """
    path = Path(path)
    if precision not in DTYPES:
        raise ValueError(f"unknown LoRA precision {precision!r}; expected one of {', '.join(DTYPES)}")
    if format == "diffusers":
        tensors, header = diffusers_state_dict(lora, DTYPES[precision])
        if origin is not None:
            header.update(modelspec_header(origin, path.stem, IMPLEMENTATION_DIFFUSERS))
    elif format == "kohya":
        flux = origin is not None and origin.family.transformer.startswith("flux-1")
        tensors, header = kohya_state_dict(lora, DTYPES[precision], flux)
        if origin is not None:
            implementation = IMPLEMENTATION_DIFFUSERS if lora.sdxl_layers_per_block is None else IMPLEMENTATION_SGM
            implementation = IMPLEMENTATION_FLUX if flux else implementation
            header.update(kohya_training_header(origin, path.stem))
            header.update(modelspec_header(origin, path.stem, implementation))
    else:
        raise ValueError(f"unknown LoRA format {format!r}; expected one of {', '.join(FORMATS)}")
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata={"format": "pt", **header}))
