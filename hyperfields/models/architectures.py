"""The real models' architectures, from their public configs: real-size benchmarks and layout tests without downloads.

Built with random weights; `on_meta=True` builds the module tree without allocating any weights, which is
all that layouts and target names need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# unet/config.json of stable-diffusion-v1-5/stable-diffusion-v1-5 (also runwayml/stable-diffusion-v1-5).
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (keys at their default values left out).
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


# transformer/config.json of black-forest-labs/FLUX.1-dev.
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# transformer/config.json of stabilityai/stable-diffusion-3.5-medium.
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}

# scheduler/scheduler_config.json of each (FlowMatchEulerDiscreteScheduler): FLUX.1-dev shifts sigma by the image's
# token count, SD 3.5 by a fixed 3.
FLOW_SCHEDULERS: dict[str, dict[str, Any]] = {
    "flux-dev": {
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    "sd35-medium": {"shift": 3.0},
}

# The transformer (DiT) bases by name: their diffusers class and config.
TRANSFORMERS: dict[str, tuple[str, dict[str, Any]]] = {
    "flux-dev": ("FluxTransformer2DModel", FLUX_DEV_TRANSFORMER),
    "sd35-medium": ("SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER),
}
# Their pipeline classes and how many text encoders each has.
_PIPELINES = {"flux-dev": ("FluxPipeline", 2), "sd35-medium": ("StableDiffusion3Pipeline", 3)}


@dataclass(frozen=True)
class Conditioning:
    """What the text side feeds a UNet: sequence length and width of the text embeddings, pooled width (SDXL)."""

    length: int
    width: int
    pooled: int | None = None


UNETS: dict[str, tuple[dict[str, Any], Conditioning]] = {
    "sd15": (SD15_UNET, Conditioning(77, 768)),  # CLIP ViT-L/14 last hidden state
    "sdxl": (SDXL_UNET, Conditioning(77, 2048, pooled=1280)),  # CLIP-L (768) + OpenCLIP-bigG (1280) penultimate states
}

# config.json of facebook/dinov2-base; its image processor centre-crops to 224 px with ImageNet statistics.
DINOV2_BASE: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "layerscale_value": 1.0,
}
DINOV2_INPUT = {"size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def build_unet(
    name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", on_meta: bool = False
) -> Any:
    """The frozen, eval-mode UNet of architecture `name` ("sd15", "sdxl") with random weights."""
    from diffusers import UNet2DConditionModel

    config, _ = UNETS[name]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype`: building in fp32 and casting would need twice the memory
    try:
        with torch.device("meta" if on_meta else device):
            unet = UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(default)
    unet.requires_grad_(False)
    return unet.eval()


def build_transformer(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    on_meta: bool = False,
    **changes: Any,
) -> Any:
    """The frozen, eval-mode transformer of architecture `name` ("flux-dev", "sd35-medium") with random weights;
    `changes` replace config values (e.g. fewer blocks for a CPU benchmark)."""
    import diffusers

    kind, config = TRANSFORMERS[name]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype`: building in fp32 and casting would need twice the memory
    try:
        with torch.device("meta" if on_meta else device):
            transformer = getattr(diffusers, kind)(**{**config, **changes})
    finally:
        torch.set_default_dtype(default)
    transformer.requires_grad_(False)
    return transformer.eval()


def build_transformer_pipeline(
    name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", **changes: Any
) -> Any:
    """The family's diffusers pipeline holding only `build_transformer(name, ...)` and its flow-matching scheduler, no
    VAE or text encoders: what the flow-matching task needs to train on cached latents and text embeddings."""
    import diffusers

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULERS[name])
    transformer = build_transformer(name, dtype, device, **changes)
    kind, encoders = _PIPELINES[name]
    absent = {
        f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")[:encoders]
    }
    pipeline = getattr(diffusers, kind)(vae=None, **absent, transformer=transformer, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_dinov2_base(dtype: torch.dtype = torch.float32) -> Any:
    """A DINOv2-base vision model with random weights, and how its input is normalised (an ImageNorm)."""
    from transformers import Dinov2Config, Dinov2Model

    from hyperfields.models import ImageNorm

    model = Dinov2Model(Dinov2Config(**DINOV2_BASE)).to(dtype)
    return model, ImageNorm(**DINOV2_INPUT)
