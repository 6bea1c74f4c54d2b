"""The tiny models' shared parts: seeded random tokenizers, text encoders and VAEs, built in memory."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

# Frequent English letter pairs: enough for multi-character tokens to exist, so tokenization is realistic.
_MERGES = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "n"), ("r", "e"), ("o", "g</w>")]
# A few whole words, so the T5 tokenizer's Unigram model has pieces longer than one character to choose from.
_T5_WORDS = ("a", "the", "photo", "of", "in", "on", "dog", "cat", "sks")


def byte_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Returns a CLIP-style BPE vocabulary that covers every byte, so no prompt ever maps to the unknown token."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())  # sorted: the set order is not stable across runs
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # last, as in the real CLIP vocabulary
    return {token: i for i, token in enumerate(tokens)}, list(_MERGES)


def write_bpe_files(directory: Path) -> None:
    """Writes the CLIP tokenizer's slow-tokenizer files (vocab.json, merges.txt) into `directory`."""
    # transformers 4 cannot build CLIPTokenizer from tokenizer.json alone.
    vocab, merges = byte_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def clip_tokenizer() -> Any:
    """Returns a CLIP tokenizer over the byte vocabulary, 77 tokens long as the real one."""
    from transformers import CLIPTokenizer

    vocab, merges = byte_vocab()
    try:
        # transformers 5: in memory; merges must be tuples although the signature says list[str].
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    except TypeError:  # transformers 4: the slow tokenizer only reads files
        with tempfile.TemporaryDirectory() as scratch:
            write_bpe_files(Path(scratch))
            return CLIPTokenizer(f"{scratch}/vocab.json", f"{scratch}/merges.txt", model_max_length=77)


def clip_text_encoder(seed: int, tokenizer: Any, with_projection: bool = False) -> Any:
    """Returns a 32-wide, two-layer CLIP text encoder (with its 32-wide projection when asked)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        # The pooled output is read at the first eos token, so the ids must match the tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(text_config) if with_projection else CLIPTextModel(text_config)


def _t5_pieces() -> list[tuple[str, float]]:
    # SentencePiece's conventions without its library: "▁" starts a word; pad, eos, unk are ids 0, 1, 2 as in T5.
    characters = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -1.0) for word in _T5_WORDS]
    pieces += [(f"▁{c}", -3.0) for c in characters] + [(c, -4.0) for c in characters]
    return pieces


def t5_tokenizer() -> Any:
    """Returns a T5 tokenizer over a small Unigram vocabulary (letters, digits, punctuation, a few words)."""
    from transformers import T5TokenizerFast

    try:  # transformers 5 builds the Unigram model from the pieces in memory
        return T5TokenizerFast(vocab=_t5_pieces(), extra_ids=0)
    except TypeError:  # transformers 4: the fast tokenizer wraps a tokenizers object
        from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import Unigram

        tokenizer = Tokenizer(Unigram(_t5_pieces(), unk_id=2))
        tokenizer.normalizer = normalizers.Replace(" {2,}", " ")
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return T5TokenizerFast(tokenizer_object=tokenizer, extra_ids=0, eos_token="</s>", pad_token="<pad>")


def t5_text_encoder(seed: int, tokenizer: Any, width: int) -> Any:
    """Returns a `width`-wide, two-layer T5 encoder."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def tiny_vae(seed: int, scaling_factor: float, latent_channels: int = 4, shift_factor: float | None = None) -> Any:
    """Returns a three-block VAE: 64 px images give 16 x 16 latents of `latent_channels` channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Two downsampling blocks keep a denoiser step on a CPU to milliseconds while every code path (cross-attention,
    # VAE, scheduler) is the real one. FLUX's and SD3's VAEs (16 channels, a shift) have no quant convs.
    flow = shift_factor is not None
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64),
        latent_channels=latent_channels,
        sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=not flow,
        use_post_quant_conv=not flow,
    )
