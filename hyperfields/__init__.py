"""hyperfields: hypernetwork fields that predict diffusion LoRA weights from one image."""

__version__ = "0.1.0"
