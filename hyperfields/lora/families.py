"""Base-model families as LoRA files name them: which Stable Diffusion, FLUX.1 or SD 3.x a LoRA is for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BaseModelFamily:
    """Which base model a LoRA is for: a Stable Diffusion UNet told apart the way sd-scripts' flags (--v2,
    --v_parameterization) do, or a transformer (DiT) base by the architecture name sd-scripts gives it."""

    sdxl: bool
    v2: bool  # SD 2.x: its UNet reads 1024-wide text embeddings (OpenCLIP ViT-H), SD 1.x's read 768
    v_prediction: bool  # the scheduler predicts v, not the noise (SD 2.x 768-v)
    # FLUX.1 or SD 3.x: "flux-1-dev", "flux-1-schnell", "stable-diffusion-3-medium", "stable-diffusion-3-5-medium",
    # "stable-diffusion-3-5-large"; "" for a UNet base.
    transformer: str = ""

    @classmethod
    def from_configs(cls, unet_config: Mapping[str, Any], scheduler_config: Mapping[str, Any]) -> BaseModelFamily:
        """The family of a diffusers base model, from its UNet's and its scheduler's config."""
        sdxl = unet_config.get("addition_embed_type") == "text_time"  # SDXL's pooled-text and size conditioning
        return cls(
            sdxl=sdxl,
            v2=not sdxl and unet_config.get("cross_attention_dim") == 1024,
            v_prediction=scheduler_config.get("prediction_type") == "v_prediction",
        )

    @classmethod
    def from_transformer(cls, family: str, config: Mapping[str, Any]) -> BaseModelFamily:
        """The family of a FLUX.1 ("flux") or SD 3.x ("sd3") base from its transformer's config, told as sd-scripts
        tells it."""
        if family == "flux":  # only FLUX.1-dev is guidance-distilled
            name = "flux-1-dev" if config.get("guidance_embeds") else "flux-1-schnell"
        elif family == "sd3":  # 3.5 normalises queries and keys; 3.5 Medium adds self-attention blocks
            if config.get("qk_norm"):
                name = (
                    "stable-diffusion-3-5-medium"
                    if config.get("dual_attention_layers")
                    else "stable-diffusion-3-5-large"
                )
            else:
                name = "stable-diffusion-3-medium"
        else:
            raise ValueError(f"unknown transformer family {family!r}; expected flux or sd3")
        return cls(sdxl=False, v2=False, v_prediction=False, transformer=name)

    @property
    def base_model_version(self) -> str:
        """sd-scripts' `ss_base_model_version`: sd_v1, sd_v2, with _v for v-prediction, sdxl_base_v1-0, flux1, or the
        SD 3.x model type (medium, 5-medium, 5-large)."""
        if self.transformer.startswith("flux-1"):
            return "flux1"
        if self.transformer:
            return self.transformer.removeprefix("stable-diffusion-3-")
        if self.sdxl:
            return "sdxl_base_v1-0"
        return ("sd_v2" if self.v2 else "sd_v1") + ("_v" if self.v_prediction else "")

    @property
    def architecture(self) -> str:
        """ModelSpec's `modelspec.architecture` of a LoRA for this base model."""
        if self.transformer:
            base = self.transformer
        elif self.sdxl:
            base = "stable-diffusion-xl-v1-base"
        elif self.v2:
            base = "stable-diffusion-v2-768-v" if self.v_prediction else "stable-diffusion-v2-512"
        else:
            base = "stable-diffusion-v1"
        return f"{base}/lora"
