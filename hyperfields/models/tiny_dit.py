"""The tiny transformer (DiT) models: seeded random FLUX.1-dev and Stable Diffusion 3.5 pipelines from fixed configs.

Shaped as the real ones in small: FLUX with a CLIP and a T5 text encoder, a 16-channel VAE, double- and single-stream
blocks and the guidance embedding of FLUX.1-dev; SD3.5 with two CLIP encoders (with projections) and a T5, a
dual-attention block and RMS-normed queries and keys as SD3.5 Medium. 64 px images: 16 x 16 latents.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hyperfields.models.tiny_parts import (
    clip_text_encoder,
    clip_tokenizer,
    t5_text_encoder,
    t5_tokenizer,
    tiny_vae,
    write_bpe_files,
)

# The VAE latents' scale and shift of FLUX.1's and SD3's VAEs, so latents have the real ones' statistics.
_FLUX_VAE = dict(scaling_factor=0.3611, shift_factor=0.1159)
_SD3_VAE = dict(scaling_factor=1.5305, shift_factor=0.0609)


def save_flux_pipeline(directory: Path, seed: int) -> None:
    """Writes a tiny FluxPipeline (FLUX.1-dev-like: guidance embedding, dynamic shifting) into `directory`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2 x 2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # the T5 width
        pooled_projection_dim=32,  # the CLIP width
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),  # sums to the head width
    )
    # FLUX.1-dev's scheduler config: the shift follows the image's token count at sampling time.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(seed, latent_channels=16, **_FLUX_VAE),
        text_encoder=clip_text_encoder(seed, tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=t5_text_encoder(seed + 1, tokenizer_2, width=32),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(directory)
    write_bpe_files(directory / "tokenizer")


def save_sd3_pipeline(directory: Path, seed: int) -> None:
    """Writes a tiny StableDiffusion3Pipeline (SD3.5-Medium-like: dual attention, RMS norm) into `directory`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_3 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # the T5 width, which the two CLIP encoders' states (32 + 32) are padded to
        caption_projection_dim=32,
        pooled_projection_dim=64,  # both CLIP projections side by side
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3.5's scheduler config
        vae=tiny_vae(seed, latent_channels=16, **_SD3_VAE),
        text_encoder=clip_text_encoder(seed, tokenizer, with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(seed + 1, tokenizer, with_projection=True),
        tokenizer_2=tokenizer,
        text_encoder_3=t5_text_encoder(seed + 2, tokenizer_3, width=64),
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(directory)
    for name in ("tokenizer", "tokenizer_2"):
        write_bpe_files(directory / name)
