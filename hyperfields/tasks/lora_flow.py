"""The flow-matching task: per-sample LoRA on a frozen FLUX.1 or SD 3.x transformer, the rectified-flow loss of
diffusers' DreamBooth-LoRA scripts for each family (train_dreambooth_lora_flux.py, train_dreambooth_lora_sd3.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from hyperfields.config import LoraConfig
from hyperfields.lora import DEFAULT_TARGETS
from hyperfields.lora.batched import BatchedLora
from hyperfields.lora.families import BaseModelFamily
from hyperfields.lora.start import initial_lora_weights, lora_init_std
from hyperfields.lora.targets import find_lora_targets, lora_layout
from hyperfields.tasks.base import Weights

# Both scripts' attention projections, of the image and the text stream: the SD3 script's default targets, and the
# FLUX script's without its feed-forward layers. Taken when lora.targets is left at its (UNet) default.
TRANSFORMER_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
# The FLUX script's --guidance_scale default (FluxPipeline's too): what FLUX.1-dev's guidance embedding is fed.
FLUX_GUIDANCE = 3.5
# The scripts' defaults for the sigma density parameters.
_LOGIT_MEAN, _LOGIT_STD, _MODE_SCALE = 0.0, 1.0, 1.29


@dataclass(frozen=True)
class FlowRecipe:
    """How a family's DreamBooth-LoRA script draws sigma and compares the prediction, with its defaults."""

    weighting_scheme: str  # the sigma density and loss weighting (diffusers.training_utils): "none", "logit_normal"
    precondition_outputs: bool  # compare x_sigma - sigma * prediction with x, not the prediction with noise - x
    max_sequence_length: int  # T5 tokens per caption: the family's pipeline default


RECIPES = {
    "flux": FlowRecipe(weighting_scheme="none", precondition_outputs=False, max_sequence_length=512),
    "sd3": FlowRecipe(weighting_scheme="logit_normal", precondition_outputs=True, max_sequence_length=256),
}


@dataclass
class FlowInputs:
    """What the loss needs from a batch of conditions: VAE latents and the pipeline's text embeddings."""

    latents: torch.Tensor  # (N, 16, h, w), shifted and scaled as the VAE's config says
    text_embeddings: torch.Tensor  # (N, L, D): FLUX's T5 states; SD3's CLIP states padded and joined to T5's
    pooled_text_embeddings: torch.Tensor  # (N, P): FLUX's CLIP pooled output; SD3's two CLIP projections joined


def transformer_family(pipeline: Any) -> str:
    """ "flux" or "sd3": which DiT family a diffusers pipeline is."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if isinstance(pipeline, FluxPipeline):
        return "flux"
    if isinstance(pipeline, StableDiffusion3Pipeline):
        return "sd3"
    raise ValueError(f"{type(pipeline).__name__} is neither a FluxPipeline nor a StableDiffusion3Pipeline")


class LoraFlowTask:
    """Personalise a FLUX.1 or SD 3.x transformer with a LoRA per subject; theta_0 = (seeded A_0 != 0, B_0 = 0)."""

    def __init__(self, pipeline: Any, lora: LoraConfig, gradient_checkpointing: bool = False, name: str = "") -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.name = name  # what the pipeline was loaded from: hub id, folder or "tiny-flux" / "tiny-sd3"
        self.family = transformer_family(pipeline)
        self.recipe = RECIPES[self.family]
        self.config = lora
        patterns = TRANSFORMER_TARGETS if list(lora.targets) == list(DEFAULT_TARGETS) else lora.targets
        self.targets = find_lora_targets(self.transformer, patterns)
        self._layout = lora_layout(self.transformer, self.targets, lora.rank)
        self.scale = lora.alpha / lora.rank
        self.lora = BatchedLora.attach(self.transformer, self.targets, self.scale)
        if gradient_checkpointing:
            # Not diffusers' default function: its backward recomputation would run after the LoRA weights are cleared.
            self.transformer.enable_gradient_checkpointing(self.lora.checkpoint)
        # The training schedule before any set_timesteps: the scripts draw sigma from its 1000 training sigmas (shifted
        # by the config's shift unless the shift is dynamic). A copy, so sampling with the pipeline never moves it.
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def denoiser(self) -> torch.nn.Module:
        """The model the LoRA targets are modules of: the transformer."""
        return self.transformer

    def base_family(self) -> BaseModelFamily:
        """Which FLUX.1 or SD 3.x the base model is, to label LoRA files."""
        return BaseModelFamily.from_transformer(self.family, self.transformer.config)

    def record(self) -> dict[str, Any]:
        """The base model and its family, the LoRA's targets, rank, alpha and A_0 seed."""
        return {
            "base_model": self.name,
            "component": "transformer",
            "targets": self.targets,
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
    def prepare(self, images: torch.Tensor, captions: list[str]) -> FlowInputs:
        vae = self.pipeline.vae
        # The posterior mean, not a sample: the condition's latent is deterministic, the loss draws the noise.
        latents = vae.encode(images.to(self.device, vae.dtype)).latent_dist.mean
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        length = self.recipe.max_sequence_length
        # The pipeline's own encoding, so the LoRA is trained on the text states it is sampled with.
        if self.family == "flux":
            text, pooled, _ = self.pipeline.encode_prompt(
                captions, prompt_2=None, device=self.device, max_sequence_length=length
            )
        else:
            text, _, pooled, _ = self.pipeline.encode_prompt(
                captions, None, None, device=self.device, do_classifier_free_guidance=False, max_sequence_length=length
            )
        return FlowInputs(latents=latents.float(), text_embeddings=text, pooled_text_embeddings=pooled)

    def loss(self, weights: Weights, inputs: FlowInputs, draws: int, generator: torch.Generator) -> torch.Tensor:
        self.lora.set_weights(weights)
        try:
            return flow_matching_loss(
                self.transformer, self.family, self.scheduler, inputs, draws, generator, self.pipeline.vae_scale_factor
            )
        finally:
            self.lora.clear()


def flow_matching_loss(
    transformer: torch.nn.Module,
    family: str,
    scheduler: Any,
    inputs: FlowInputs,
    draws: int,
    generator: torch.Generator,
    vae_scale_factor: int,
) -> torch.Tensor:
    """Per sample (N,): the family script's flow-matching loss of `transformer` (with whatever LoRA it holds) on
    `draws` noise and sigma draws of each sample, sigma drawn from the training `scheduler`'s sigmas."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    recipe = RECIPES[family]
    n = inputs.latents.shape[0]
    latents = inputs.latents.repeat_interleave(draws, dim=0)  # rows ordered (sample, draw)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
    u = compute_density_for_timestep_sampling(
        recipe.weighting_scheme,
        latents.shape[0],
        logit_mean=_LOGIT_MEAN,
        logit_std=_LOGIT_STD,
        mode_scale=_MODE_SCALE,
        device=generator.device,
        generator=generator,
    )
    indices = (u * scheduler.config.num_train_timesteps).long().cpu()
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device).view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise  # rectified flow: x_sigma on the line from x to the noise
    text = inputs.text_embeddings.repeat_interleave(draws, dim=0)
    pooled = inputs.pooled_text_embeddings.repeat_interleave(draws, dim=0)
    prediction = flow_prediction(transformer, family, noisy, timesteps, text, pooled, vae_scale_factor).float()
    if recipe.precondition_outputs:
        prediction, target = prediction * -sigmas + noisy, latents
    else:
        target = noise - latents
    weighting = compute_loss_weighting_for_sd3(recipe.weighting_scheme, sigmas).float()
    per_row = (weighting * (prediction - target) ** 2).flatten(1).mean(dim=1)
    return per_row.view(n, draws).mean(dim=1)


def flow_prediction(
    transformer: torch.nn.Module,
    family: str,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    pooled: torch.Tensor,
    vae_scale_factor: int,
) -> torch.Tensor:
    """The transformer's velocity prediction (B, 16, h, w) for the noisy latents, as the family's script calls it."""
    dtype = transformer.dtype
    text, pooled = text.to(dtype), pooled.to(dtype)
    if family == "sd3":
        return transformer(
            hidden_states=noisy.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    from diffusers import FluxPipeline

    rows, channels, height, width = noisy.shape
    packed = FluxPipeline._pack_latents(noisy.to(dtype), rows, channels, height, width)  # (B, hw/4, 4C)
    image_ids = FluxPipeline._prepare_latent_image_ids(rows, height // 2, width // 2, noisy.device, dtype)
    text_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=dtype)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((rows,), FLUX_GUIDANCE, device=noisy.device)
    packed_prediction = transformer(
        hidden_states=packed,
        timestep=timesteps / 1000,  # the FLUX transformer scales its timestep by 1000 itself
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=text,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(
        packed_prediction, height * vae_scale_factor, width * vae_scale_factor, vae_scale_factor
    )
