"""Base models and image encoders: loading them by name (loading.py), and the tiny test models (tiny.py)."""

from hyperfields.models.loading import (
    ImageNorm,
    PipelineParts,
    encoder_width,
    load_denoiser,
    load_encoder,
    load_pipeline,
    load_pipeline_components,
    load_transformer_pipeline,
    pipeline_family,
    resolve_model_path,
)

__all__ = [
    "ImageNorm",
    "PipelineParts",
    "encoder_width",
    "load_denoiser",
    "load_encoder",
    "load_pipeline",
    "load_pipeline_components",
    "load_transformer_pipeline",
    "pipeline_family",
    "resolve_model_path",
]
