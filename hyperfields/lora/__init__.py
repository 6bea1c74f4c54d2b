"""LoRA targets, the batched per-sample LoRA, and the file formats other tools load."""

from typing import Literal

# The file formats lora/formats.py writes; named here so the command line can list them without importing torch.
LoraFormat = Literal["diffusers", "kohya"]
