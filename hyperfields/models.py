"""Loaded Stable Diffusion parts and image encoders, by hub id, local folder or "tiny" (seeded random test models).

"tiny" (and "tiny-xl", its Stable Diffusion XL counterpart) lets the whole tool, its tests and CI run on a CPU with
no network: the models are built from fixed configs and a fixed seed, written once into a cache folder and then
loaded like any real checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from packaging.version import Version

from hyperfields.errors import UserError

TINY = "tiny"
TINY_XL = "tiny-xl"
_TINY_VERSION = "tiny-v3"  # bump when the tiny configs change, so stale caches are not reused
# transformers renamed torch_dtype to dtype in 4.56 and warns on the old name from 5.0.
_TF_DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
# Frequent English letter pairs: enough for multi-character tokens to exist, so tokenization is realistic.
_MERGES = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "n"), ("r", "e"), ("o", "g</w>")]


@dataclass
class PipelineParts:
    """The frozen pieces of a Stable Diffusion (1.x, 2.x or XL) pipeline that training needs."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    text_encoder_2: Any = None  # SDXL only: the second text encoder (with projection) and its tokenizer
    tokenizer_2: Any = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def to(self, device: torch.device | str) -> PipelineParts:
        """Move every model to `device`; returns self."""
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.to(device)
        return self


@dataclass(frozen=True)
class ImageNorm:
    """How an encoder expects its input: square side in pixels and per-channel mean/std after scaling to [0, 1]."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# ---------------------------------------------------------------------------------------------- tiny models


def _byte_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Returns a CLIP-style BPE vocabulary that covers every byte, so no prompt ever maps to the unknown token."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())  # sorted: the set order is not stable across runs
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # last, as in the real CLIP vocabulary
    return {token: i for i, token in enumerate(tokens)}, list(_MERGES)


def _write_bpe_files(directory: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    # Slow-tokenizer files too: transformers 4 cannot build CLIPTokenizer from tokenizer.json alone.
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _tiny_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = _byte_vocab()
    try:
        # transformers 5: in memory; merges must be tuples although the signature says list[str].
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    except TypeError:  # transformers 4: the slow tokenizer only reads files
        with tempfile.TemporaryDirectory() as scratch:
            _write_bpe_files(Path(scratch), vocab, merges)
            return CLIPTokenizer(f"{scratch}/vocab.json", f"{scratch}/merges.txt", model_max_length=77)


def _tiny_vae(seed: int, scaling_factor: float) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Three blocks, two downsampling: 64 px images give 16 x 16 latents, so a UNet step on a CPU takes
    # milliseconds while every code path (cross-attention, VAE, scheduler) is the real one.
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64), latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=scaling_factor,
    )


def _tiny_text_encoder(seed: int, tokenizer: Any, with_projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        # The pooled output is read at the first eos token, so the ids must match the tokenizer's.
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(text_config) if with_projection else CLIPTextModel(text_config)


# Stable Diffusion's own schedule settings, so noise levels look like the real ones and the
# pipeline does not warn about a legacy scheduler config.
_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", steps_offset=1)


def _save_pipeline(directory: Path, seed: int) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    # Cross-attention in the down, mid and up blocks: 12 attention modules for LoRA to target.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    pipeline = StableDiffusionPipeline(
        vae=_tiny_vae(seed, 0.18215), text_encoder=_tiny_text_encoder(seed, tokenizer), tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(**_SD_SCHEDULE, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    _write_bpe_files(directory / "tokenizer", *_byte_vocab())


def _save_pipeline_xl(directory: Path, seed: int) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    # SDXL's shape in small: no attention in the first block, linear proj_in/out, two transformer layers
    # deeper down, context = both text encoders' widths concatenated (32 + 32), and the "text_time"
    # added embedding of the pooled text (32) plus six size/crop numbers (8 features each).
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=64, attention_head_dim=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=_tiny_vae(seed, 0.13025), text_encoder=_tiny_text_encoder(seed, tokenizer),
        text_encoder_2=_tiny_text_encoder(seed + 1, tokenizer, with_projection=True), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**_SD_SCHEDULE, timestep_spacing="leading"),
    )
    pipeline.save_pretrained(directory)
    for name in ("tokenizer", "tokenizer_2"):
        _write_bpe_files(directory / name, *_byte_vocab())


def _save_encoder(directory: Path, seed: int) -> None:
    from transformers import ViTConfig, ViTModel

    try:  # transformers 5 needs torchvision for ViTImageProcessor and warns when falling back to this one
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor

    torch.manual_seed(seed)
    config = ViTConfig(  # 32 px in 8 px patches: 16 patch tokens plus CLS
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=37,
    )
    # Kept with its pooler: AutoModel builds ViTModel with one, and a missing one would be
    # freshly random (and warned about) on every load.
    ViTModel(config).save_pretrained(directory)
    Processor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)


def _staging_for(final: Path) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only, and it becomes the final, shareable folder
    return staging


def _install(final: Path, build: Callable[[Path], None]) -> None:
    """Builds into a hidden sibling and renames it into place, so `final` is either absent or complete."""
    staging = _staging_for(final)
    try:
        build(staging)
        if final.exists():
            # rename() only replaces an empty directory, so move the old one aside first.
            trash = staging.with_name(staging.name + ".old")
            os.replace(final, trash)
            os.replace(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_tiny_models(directory: Path, seed: int = 0) -> None:
    """Writes seeded random tiny models: `directory/pipeline` (Stable Diffusion), `directory/pipeline-xl` (SDXL)
    and `directory/encoder` (ViT)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _install(directory / "pipeline", lambda d: _save_pipeline(d, seed))
    _install(directory / "pipeline-xl", lambda d: _save_pipeline_xl(d, seed))
    _install(directory / "encoder", lambda d: _save_encoder(d, seed))


def _tiny_complete(directory: Path) -> bool:
    pipelines = all((directory / name / "model_index.json").is_file() for name in ("pipeline", "pipeline-xl"))
    return pipelines and (directory / "encoder" / "config.json").is_file()


def cache_root() -> Path:
    """Returns the folder hyperfields caches into: $HYPERFIELDS_CACHE, else ~/.cache/hyperfields."""
    return Path(os.environ.get("HYPERFIELDS_CACHE") or Path.home() / ".cache" / "hyperfields").expanduser()


def tiny_models_dir() -> Path:
    """Returns the cache folder holding the tiny models, writing them on first use."""
    root = cache_root()
    target = root / _TINY_VERSION
    if _tiny_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = _staging_for(target)
    try:
        write_tiny_models(staging)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first: its copy is identical (same seed), so keep it.
            if not _tiny_complete(target):
                raise UserError(f"tiny model cache {target} exists but is incomplete; delete it and retry") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------- loading


def resolve_model_path(name: str, kind: Literal["pipeline", "encoder"]) -> str:
    """Returns where to load `name` from: the tiny cache for "tiny" / "tiny-xl", a local folder as is, else the hub id."""
    if name == TINY:
        return str(tiny_models_dir() / kind)
    if name == TINY_XL and kind == "pipeline":
        return str(tiny_models_dir() / "pipeline-xl")
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local)
    return name


def _reason(exc: BaseException) -> str:
    # Library errors run to many lines; the first one says what went wrong.
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first[:200]}"


def _pipeline_error(base_model: str, path: str, exc: BaseException) -> UserError:
    local = Path(path)
    if local.is_dir() and (local / "unet" / "config.json").is_file():
        what = f"could not load the Stable Diffusion folder {path}"
    elif local.is_dir():
        what = f"{path} is not a diffusers Stable Diffusion folder (no unet/config.json)"
    else:
        what = "not a diffusers Stable Diffusion folder (no unet/config.json) and not reachable as a hub id"
    return UserError(f"base model {base_model!r}: {what} ({_reason(exc)})")


def load_pipeline(base_model: str, dtype: torch.dtype = torch.float32) -> Any:
    """Returns `base_model` as the diffusers pipeline a user would load (SD or SDXL, by its model_index.json), with its own scheduler."""
    from diffusers import DiffusionPipeline

    path = resolve_model_path(base_model, "pipeline")
    try:
        pipeline = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
    except Exception as exc:
        raise _pipeline_error(base_model, path, exc) from exc
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_pipeline_components(base_model: str, dtype: torch.dtype = torch.float32) -> PipelineParts:
    """Returns the frozen, eval-mode unet, vae, text encoder(s), tokenizer(s) and DDPM noise scheduler of `base_model`.

    An SDXL base (its UNet takes the "text_time" added embedding) also gets text_encoder_2 and tokenizer_2.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = resolve_model_path(base_model, "pipeline")
    extra: dict[str, Any] = {}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        # SDXL's VAE overflows in fp16 (its config says force_upcast): keep it in fp32 then; bf16 is fine.
        if dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **{_TF_DTYPE_KW: dtype})
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        # The UNet decides, not the folder layout: it is what needs the pooled text and the size ids.
        if unet.config.addition_embed_type == "text_time":
            extra["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **{_TF_DTYPE_KW: dtype})
            extra["tokenizer_2"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
    except Exception as exc:
        raise _pipeline_error(base_model, path, exc) from exc
    for module in (unet, vae, text_encoder, extra.get("text_encoder_2")):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return PipelineParts(unet, vae, text_encoder, tokenizer, noise_scheduler, **extra)


def _side(size: Any) -> int | None:
    """Reads a square side from an image processor's size: an int, a dict or transformers 5's SizeDict."""
    if size is None:
        return None
    if isinstance(size, int):
        return size
    for key in ("height", "shortest_edge"):
        value = size.get(key)
        if value:
            return int(value)
    return None


def _image_norm(path: str, model: torch.nn.Module) -> ImageNorm:
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except Exception:  # no preprocessor_config.json: fall back to the model config below
        processor = None
    side = None
    if processor is not None:
        crop = _side(getattr(processor, "crop_size", None))
        # Center-cropping processors (CLIP, DINOv2) feed the model the crop, not the resized image.
        if getattr(processor, "do_center_crop", False) and crop:
            side = crop
        else:
            side = _side(getattr(processor, "size", None)) or crop
    side = side or int(getattr(model.config, "image_size", 224))
    mean = getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)
    std = getattr(processor, "image_std", None) or (0.5, 0.5, 0.5)
    if processor is not None and getattr(processor, "do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return ImageNorm(size=side, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


def load_encoder(encoder: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, ImageNorm]:
    """Returns the image encoder (the vision tower of a full CLIP/SigLIP model) and how to normalise its input."""
    from transformers import AutoModel

    path = resolve_model_path(encoder, "encoder")
    try:
        model = AutoModel.from_pretrained(path, **{_TF_DTYPE_KW: dtype})
    except Exception as exc:
        if Path(path).is_dir():
            what = f"{path} is not a transformers vision model folder (config.json with model_type, weights)"
        else:
            what = "not a local transformers model folder and not reachable as a hub id"
        raise UserError(f"encoder {encoder!r}: {what} ({_reason(exc)})") from exc
    # Text-image models would otherwise need text inputs in forward(); only the vision tower is wanted.
    vision = getattr(model, "vision_model", None)
    if isinstance(vision, torch.nn.Module):
        model = vision
    return model, _image_norm(path, model)


def encoder_width(model: torch.nn.Module) -> int:
    """Returns the feature width of the encoder's last_hidden_state."""
    config = model.config
    if getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    if getattr(config, "hidden_sizes", None):  # convolutional encoders (ConvNeXt, ResNet) list one per stage
        return int(config.hidden_sizes[-1])
    raise UserError(f"encoder {type(model).__name__}: its config has no hidden_size to size the hypernetwork by")
