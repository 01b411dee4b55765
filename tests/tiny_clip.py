"""Tiny transformers CLIP models and processors written to directories as ``save_pretrained``
does, built offline (OpenAI's BPE from the copy inside open_clip), for the reward-metric tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

TEXTS = [
    "a photo of a cat",
    "a red dog running on the beach at sunset, highly detailed, 4k",
    "two blue birds on a wire",
    "an empty street at night",
]


def images(n: int, seed: int = 0, size: tuple[int, int] = (48, 64)) -> Tensor:
    """Smooth random uint8 images [n, 3, H, W] (low-frequency noise, upsampled)."""
    g = torch.Generator().manual_seed(seed)
    x = nn.functional.interpolate(
        torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False
    )
    return (x * 255).round().to(torch.uint8)


def write_tokenizer(d: Path) -> None:
    """OpenAI's CLIP BPE as vocab.json/merges.txt (open_clip names two special tokens
    differently)."""
    from open_clip.tokenizer import SimpleTokenizer

    st = SimpleTokenizer()
    vocab = dict(st.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(st.bpe_ranks, key=st.bpe_ranks.get)
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))


def write_processor(d: Path, size: int = 224) -> None:
    """Tokenizer + the CLIP image-processor config of the real repositories (224 px)."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    write_tokenizer(d)
    CLIPTokenizer.from_pretrained(str(d), model_max_length=77).save_pretrained(str(d))
    CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(str(d))


def write_model(d: Path, *, projection_dim: int = 16, size: int = 224, seed: int = 0) -> None:
    """A random 1-layer CLIPModel with the real input size (patch 32) to ``d``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=size,
            patch_size=32,
        ),
        projection_dim=projection_dim,
    )
    model = CLIPModel(config)
    with torch.no_grad():  # a logit scale other than the default, so that it is exercised
        model.logit_scale.fill_(3.0)
    model.save_pretrained(str(d))
