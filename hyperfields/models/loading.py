"""Loaded Stable Diffusion parts and image encoders, by hub id, local folder or "tiny" (models/tiny.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from packaging.version import Version

from hyperfields.errors import UserError, error_line
from hyperfields.models.tiny import TINY, TINY_PIPELINES, tiny_models_dir

# transformers renamed torch_dtype to dtype in 4.56 and warns on the old name from 5.0.
_TF_DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


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
    name: str = ""  # what they were loaded from: hub id, folder or "tiny"

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


def resolve_model_path(name: str, kind: Literal["pipeline", "encoder", "clip", "dino"]) -> str:
    """Where to load `name` from: the tiny cache for "tiny", "tiny-xl", "tiny-flux", "tiny-sd3", a local folder as is,
    else the hub id."""
    if name in TINY_PIPELINES and kind == "pipeline":
        return str(tiny_models_dir() / TINY_PIPELINES[name])
    if name == TINY:
        return str(tiny_models_dir() / kind)
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local)
    return name


def _pipeline_error(base_model: str, path: str, exc: BaseException) -> UserError:
    local = Path(path)
    if local.is_dir() and any((local / part / "config.json").is_file() for part in ("unet", "transformer")):
        what = f"could not load the diffusers pipeline folder {path}"
    elif local.is_dir():
        what = f"{path} is not a diffusers pipeline folder (no unet/config.json or transformer/config.json)"
    else:
        what = "not a diffusers pipeline folder (no unet/ or transformer/config.json) and not reachable as a hub id"
    return UserError(f"base model {base_model!r}: {what} ({error_line(exc)})")


def load_pipeline(base_model: str, dtype: torch.dtype = torch.float32) -> Any:
    """`base_model` as the diffusers pipeline a user would load (SD or SDXL, by its model_index.json): its own
    scheduler, its progress bar on."""
    from diffusers import DiffusionPipeline

    path = resolve_model_path(base_model, "pipeline")
    try:
        pipeline = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
    except Exception as exc:
        raise _pipeline_error(base_model, path, exc) from exc
    return pipeline


# The diffusers pipeline classes of the transformer (DiT) bases hyperfields trains on, by family.
TRANSFORMER_FAMILIES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}


def pipeline_family(base_model: str) -> Literal["unet", "flux", "sd3"]:
    """Which family `base_model` is, from its model_index.json: "flux" (FLUX.1), "sd3" (SD 3.x), else "unet"."""
    from diffusers import DiffusionPipeline

    path = resolve_model_path(base_model, "pipeline")
    try:
        index = DiffusionPipeline.load_config(path)
    except Exception as exc:
        raise _pipeline_error(base_model, path, exc) from exc
    return TRANSFORMER_FAMILIES.get(str(index.get("_class_name")), "unet")  # type: ignore[return-value]


def load_transformer_pipeline(base_model: str, dtype: torch.dtype = torch.float32) -> Any:
    """`base_model` (FLUX.1 or SD 3.x) as its diffusers pipeline, every model frozen and in eval mode, no progress bar:
    the transformer, VAE and text encoders the flow-matching task trains with."""
    pipeline = load_pipeline(base_model, dtype)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            component.eval()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_denoiser(base_model: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """`base_model`'s UNet, or its transformer for FLUX.1 and SD 3.x, alone: frozen and in eval mode."""
    import diffusers

    family = pipeline_family(base_model)
    component, kind = {
        "unet": ("unet", "UNet2DConditionModel"),
        "flux": ("transformer", "FluxTransformer2DModel"),
        "sd3": ("transformer", "SD3Transformer2DModel"),
    }[family]
    path = resolve_model_path(base_model, "pipeline")
    try:
        model = getattr(diffusers, kind).from_pretrained(path, subfolder=component, torch_dtype=dtype)
    except Exception as exc:
        raise _pipeline_error(base_model, path, exc) from exc
    return model.requires_grad_(False).eval()


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
            extra["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", **{_TF_DTYPE_KW: dtype}
            )
            extra["tokenizer_2"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
    except Exception as exc:
        raise _pipeline_error(base_model, path, exc) from exc
    for module in (unet, vae, text_encoder, extra.get("text_encoder_2")):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return PipelineParts(unet, vae, text_encoder, tokenizer, noise_scheduler, **extra, name=base_model)


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
        raise UserError(f"encoder {encoder!r}: {what} ({error_line(exc)})") from exc
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
