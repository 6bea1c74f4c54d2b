"""The tiny models: seeded random Stable Diffusion, SDXL, FLUX.1, SD3.5, ViT, CLIP and DINO models from fixed configs.

"tiny" (and "tiny-xl", "tiny-flux", "tiny-sd3": its SDXL, FLUX.1 and SD3.5 counterparts) lets the whole tool, its
tests and CI run on a CPU with no network: the models are built from fixed configs and a fixed seed, written once into
a cache folder and then loaded like any real checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hyperfields.errors import UserError
from hyperfields.files import cache_root, write_folder
from hyperfields.models.tiny_dit import save_flux_pipeline, save_sd3_pipeline
from hyperfields.models.tiny_parts import clip_text_encoder, clip_tokenizer, tiny_vae, write_bpe_files

TINY = "tiny"
TINY_XL = "tiny-xl"
TINY_FLUX = "tiny-flux"
TINY_SD3 = "tiny-sd3"
# Each tiny base model's folder in the cache.
TINY_PIPELINES = {TINY: "pipeline", TINY_XL: "pipeline-xl", TINY_FLUX: "pipeline-flux", TINY_SD3: "pipeline-sd3"}
_TINY_VERSION = "tiny-v5"  # bump when the tiny configs change, so stale caches are not reused

# Stable Diffusion's own schedule settings, so noise levels look like the real ones and the
# pipeline does not warn about a legacy scheduler config.
_SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
)


def _save_pipeline(directory: Path, seed: int) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    # Cross-attention in the down, mid and up blocks: 12 attention modules for LoRA to target.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(seed, 0.18215),
        text_encoder=clip_text_encoder(seed, tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**_SD_SCHEDULE, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    write_bpe_files(directory / "tokenizer")


def _save_pipeline_xl(directory: Path, seed: int) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    # SDXL's shape in small: no attention in the first block, linear proj_in/out, two transformer layers
    # deeper down, context = both text encoders' widths concatenated (32 + 32), and the "text_time"
    # added embedding of the pooled text (32) plus six size/crop numbers (8 features each).
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,
        attention_head_dim=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=tiny_vae(seed, 0.13025),
        text_encoder=clip_text_encoder(seed, tokenizer),
        text_encoder_2=clip_text_encoder(seed + 1, tokenizer, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_SD_SCHEDULE, timestep_spacing="leading"),
    )
    pipeline.save_pretrained(directory)
    for name in ("tokenizer", "tokenizer_2"):
        write_bpe_files(directory / name)


def _save_encoder(directory: Path, seed: int) -> None:
    """A ViT with its CLS token: the field's image encoder, and the DINO of the evaluation's image similarity."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(  # 32 px in 8 px patches: 16 patch tokens plus CLS
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
    )
    # Kept with its pooler: AutoModel builds ViTModel with one, and a missing one would be
    # freshly random (and warned about) on every load.
    ViTModel(config).save_pretrained(directory)
    processor = _image_processor("ViT")(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(directory)


def _image_processor(family: str) -> Any:
    import transformers

    # transformers 5 needs torchvision for the default image processors and warns when falling back to these.
    return getattr(transformers, f"{family}ImageProcessorPil", None) or getattr(transformers, f"{family}ImageProcessor")


def _save_clip(directory: Path, seed: int) -> None:
    """A CLIP model with its processor (image processor and tokenizer): the evaluation's CLIP-I and CLIP-T."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **layers,
    )
    config = CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    CLIPModel(config).save_pretrained(directory)
    image_processor = _image_processor("CLIP")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    write_bpe_files(directory)


def write_tiny_models(directory: Path, seed: int = 0) -> None:
    """Writes seeded random tiny models: `directory/pipeline` (Stable Diffusion), `directory/pipeline-xl` (SDXL),
    `directory/pipeline-flux` (FLUX.1-dev), `directory/pipeline-sd3` (SD3.5), `directory/encoder` (ViT), and the
    evaluation's `directory/clip` (CLIP) and `directory/dino` (a ViT)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_folder(directory / "pipeline", lambda d: _save_pipeline(d, seed))
    write_folder(directory / "pipeline-xl", lambda d: _save_pipeline_xl(d, seed))
    write_folder(directory / "pipeline-flux", lambda d: save_flux_pipeline(d, seed))
    write_folder(directory / "pipeline-sd3", lambda d: save_sd3_pipeline(d, seed))
    write_folder(directory / "encoder", lambda d: _save_encoder(d, seed))
    write_folder(directory / "clip", lambda d: _save_clip(d, seed))
    write_folder(directory / "dino", lambda d: _save_encoder(d, seed + 1))


def _tiny_complete(directory: Path) -> bool:
    pipelines = all((directory / name / "model_index.json").is_file() for name in TINY_PIPELINES.values())
    return pipelines and all((directory / name / "config.json").is_file() for name in ("encoder", "clip", "dino"))


def tiny_models_dir() -> Path:
    """Returns the cache folder holding the tiny models, writing them on first use."""
    root = cache_root()
    target = root / _TINY_VERSION
    if _tiny_complete(target):
        return target
    # Another process may finish first: its copy is identical (same seed), so it is kept.
    write_folder(target, write_tiny_models, keep_existing=True)
    if not _tiny_complete(target):
        raise UserError(f"tiny model cache {target} exists but is incomplete; delete it and retry")
    return target
