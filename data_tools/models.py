"""Random-weight diffusers-format model directories, built offline from configs.

Tests, benchmarks and offline demos need an `AutoencoderKL` and a CLIP text encoder in
the very layout real checkpoints use (`vae/`, `text_encoder/`, `tokenizer/` with
`vocab.json` + `merges.txt`), without any model hub access. Weights are random but
seeded; sizes are chosen by the caller (tiny for tests, SD-sized for benchmarks).
"""

from __future__ import annotations

import json
import os
import string

import torch

# Stable Diffusion's VAE shape (weights here are random)
SD_VAE_BLOCKS = (128, 256, 512, 512)


def save_random_vae(path: str, *, block_out_channels: tuple[int, ...] = (8, 16),
                    latent_channels: int = 4, layers_per_block: int = 1, norm_num_groups: int = 4,
                    scaling_factor: float = 0.18215, seed: int = 0) -> str:
    """Write an AutoencoderKL to `path/vae/`; returns `path`. Downscale is 2^(levels-1)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups, scaling_factor=scaling_factor, sample_size=64,
    )
    vae.save_pretrained(os.path.join(path, "vae"))
    return path


def _write_tokenizer(folder: str) -> None:
    """A character-level CLIP BPE vocabulary (lowercase letters and digits, no merges)."""
    os.makedirs(folder, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, f)


def save_random_clip_text(path: str, *, hidden_size: int = 16, layers: int = 1, heads: int = 2,
                          max_positions: int = 77, seed: int = 0) -> str:
    """Write `path/text_encoder/` (CLIPTextModel) and `path/tokenizer/`; returns `path`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    _write_tokenizer(os.path.join(path, "tokenizer"))
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=2 + 2 * 36, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    CLIPTextModel(cfg).save_pretrained(os.path.join(path, "text_encoder"))
    return path
