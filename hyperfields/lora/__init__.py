"""LoRA targets, the batched per-sample LoRA, and the file formats other tools load."""

from typing import Literal

# The file formats lora/formats.py writes; named here so the command line can list them without importing torch.
LoraFormat = Literal["diffusers", "kohya"]
# The number types a LoRA file stores its tensors in: fp16 is what shared LoRA files use, half the size of fp32.
LoraPrecision = Literal["fp16", "bf16", "fp32"]
