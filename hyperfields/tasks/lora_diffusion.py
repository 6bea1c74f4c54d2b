"""The LoRA-diffusion task: per-sample LoRA on a frozen SD 1.x/2.x or SDXL UNet, DreamBooth noise-prediction loss."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hyperfields.config import LoraConfig
from hyperfields.errors import UserError
from hyperfields.lora.batched import BatchedLora
from hyperfields.lora.formats import BaseModelFamily
from hyperfields.lora.start import initial_lora_weights, lora_init_std
from hyperfields.lora.targets import find_lora_targets, lora_layout
from hyperfields.models import PipelineParts
from hyperfields.tasks.base import Weights


@dataclass
class DiffusionInputs:
    """What the loss needs from a batch of conditions: VAE latents and text embeddings (and SDXL's extra conditions)."""

    latents: torch.Tensor  # (N, C, h, w), already scaled by the VAE's scaling factor
    text_embeddings: torch.Tensor  # (N, L, D)
    pooled_text_embeddings: torch.Tensor | None = None  # SDXL: (N, P) projected pooled output of text_encoder_2
    time_ids: torch.Tensor | None = None  # SDXL: (N, 6) original size, crop top-left, target size, in pixels


class LoraDiffusionTask:
    """Personalise a Stable Diffusion UNet with a LoRA per subject; theta_0 = (seeded A_0 != 0, B_0 = 0)."""

    def __init__(self, parts: PipelineParts, lora: LoraConfig, gradient_checkpointing: bool = False) -> None:
        self.parts = parts
        self.config = lora
        self.targets = find_lora_targets(parts.unet, lora.targets)
        self._layout = lora_layout(parts.unet, self.targets, lora.rank)
        self.scale = lora.alpha / lora.rank
        self.lora = BatchedLora.attach(parts.unet, self.targets, self.scale)
        if gradient_checkpointing:
            # Not diffusers' default function: its backward recomputation would run after the LoRA weights are cleared.
            parts.unet.enable_gradient_checkpointing(self.lora.checkpoint)
        prediction_type = parts.noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(
                f"base model scheduler: prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)"
            )
        self.prediction_type = prediction_type

    @property
    def device(self) -> torch.device:
        return next(self.parts.unet.parameters()).device

    @property
    def denoiser(self) -> torch.nn.Module:
        """The model the LoRA targets are modules of: the UNet."""
        return self.parts.unet

    def sdxl_layers_per_block(self) -> int | None:
        """For an SDXL UNet, its layers per block (kohya files name SDXL modules by the SGM layout); else None."""
        return int(self.parts.unet.config.layers_per_block) if self.parts.is_sdxl else None

    def base_family(self) -> BaseModelFamily:
        """Which Stable Diffusion the base model is (1.x, 2.x or XL; noise or v-prediction), to label LoRA files."""
        return BaseModelFamily.from_configs(self.parts.unet.config, self.parts.noise_scheduler.config)

    def record(self) -> dict[str, Any]:
        """The base model and its family, the LoRA's targets, rank, alpha and A_0 seed, and SDXL's layers per block."""
        return {
            "base_model": self.parts.name,
            "targets": self.targets,
            "sdxl_layers_per_block": self.sdxl_layers_per_block(),
            "rank": self.config.rank,
            "alpha": self.config.alpha,
            "init_seed": self.config.init_seed,
            "base_family": dataclasses.asdict(self.base_family()),
        }

    def layout(self) -> dict[str, tuple[int, ...]]:
        return dict(self._layout)

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return initial_lora_weights(self._layout, self.config.init_seed)

    def init_std(self) -> dict[str, float]:
        return lora_init_std(self._layout)

    @torch.no_grad()
    def prepare(self, images: torch.Tensor, captions: list[str]) -> DiffusionInputs:
        parts = self.parts
        vae_dtype = next(parts.vae.parameters()).dtype
        # The posterior mean, not a sample: the condition's latent is deterministic, the loss draws the noise.
        latents = parts.vae.encode(images.to(self.device, vae_dtype)).latent_dist.mean
        latents = latents * parts.vae.config.scaling_factor
        if not parts.is_sdxl:
            text = parts.text_encoder(self._tokens(parts.tokenizer, captions))[0]
            return DiffusionInputs(latents=latents.float(), text_embeddings=text)
        # SDXL as its pipelines condition it: both encoders' penultimate hidden states side by side, the pooled
        # text from the second; sizes as the pipeline's defaults (no crop, original = target = the image size), so
        # the LoRA is trained under the conditions it is used with.
        first = parts.text_encoder(self._tokens(parts.tokenizer, captions), output_hidden_states=True)
        second = parts.text_encoder_2(self._tokens(parts.tokenizer_2, captions), output_hidden_states=True)
        text = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # (N, L, D1 + D2)
        height, width = images.shape[-2:]
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=self.device)
        return DiffusionInputs(
            latents=latents.float(),
            text_embeddings=text,
            pooled_text_embeddings=second.text_embeds,
            time_ids=time_ids.expand(len(captions), 6),
        )

    def _tokens(self, tokenizer: Any, captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def loss(self, weights: Weights, inputs: DiffusionInputs, draws: int, generator: torch.Generator) -> torch.Tensor:
        n = inputs.latents.shape[0]
        latents = inputs.latents.repeat_interleave(draws, dim=0)  # rows ordered (sample, draw)
        text = inputs.text_embeddings.repeat_interleave(draws, dim=0)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
        steps = self.parts.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=generator.device).to(
            latents.device
        )
        noisy = self.parts.noise_scheduler.add_noise(latents, noise, timesteps)
        target = (
            noise
            if self.prediction_type == "epsilon"
            else self.parts.noise_scheduler.get_velocity(latents, noise, timesteps)
        )
        unet_dtype = next(self.parts.unet.parameters()).dtype
        added = None
        if inputs.pooled_text_embeddings is not None:
            added = {
                "text_embeds": inputs.pooled_text_embeddings.repeat_interleave(draws, dim=0).to(unet_dtype),
                "time_ids": inputs.time_ids.repeat_interleave(draws, dim=0).to(unet_dtype),
            }
        self.lora.set_weights(weights)
        try:
            prediction = self.parts.unet(
                noisy.to(unet_dtype), timesteps, text.to(unet_dtype), added_cond_kwargs=added
            ).sample
        finally:
            self.lora.clear()
        per_row = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
        return per_row.view(n, draws).mean(dim=1)  # (N,)
