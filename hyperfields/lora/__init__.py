"""LoRA targets, the batched per-sample LoRA, and the file formats other tools load."""

from typing import Literal

# Named here, without importing torch, so that the configuration and the command line can use them.
LoraFormat = Literal["diffusers", "kohya"]  # the file formats lora/formats.py writes
# The number types a LoRA file stores its tensors in: fp16 is what shared LoRA files use, half the size of fp32.
LoraPrecision = Literal["fp16", "bf16", "fp32"]
# UNet attention projections: the diffusers DreamBooth-LoRA default, and lora.targets' default.
DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
