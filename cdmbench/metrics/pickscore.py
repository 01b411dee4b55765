"""PickScore of (prompt, image) pairs (Kirstain et al. 2023, arXiv 2305.01569).

As the authors' code computes it (yuvalkirstain/PickScore README; byliutao/cdm
``cdm/rewards/pickscore_scorer.py`` is the same): transformers ``CLIPModel``
``yuvalkirstain/PickScore_v1`` (CLIP ViT-H/14 fine-tuned on Pick-a-Pic), the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (PIL bicubic resize of the shortest side to 224,
center crop 224, OpenAI mean/std; text padded per batch, truncated at 77 tokens), and per pair
``s_i = exp(logit_scale) * cos(E_image_i, E_text_i)`` (no softmax over images). The reported
value is the mean over samples.

Weights: ``model=DIR`` / ``$CDMBENCH_PICKSCORE`` and ``processor=DIR`` /
``$CDMBENCH_PICKSCORE_PROCESSOR`` (directories as ``save_pretrained`` or ``hf download``
write them), else the Hugging Face cache, else a download.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdmbench.metrics import _hf_clip as hf
from cdmbench.metrics.base import PerSampleMetric, Value

MODEL_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
ENV, ENV_PROCESSOR = "CDMBENCH_PICKSCORE", "CDMBENCH_PICKSCORE_PROCESSOR"
MAX_TOKENS = 77


class PickScore(PerSampleMetric):
    """PickScore-v1: exp(logit_scale) x image-prompt cosine of the fine-tuned CLIP ViT-H/14."""

    name = "pickscore"
    values = {
        "pickscore": Value(
            higher_is_better=True,
            tolerance="0.2",
            description="PickScore-v1, exp(logit_scale) * cos (~100 x cosine), mean over samples",
        )
    }

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        processor: str | os.PathLike | None = None,
        *,
        device: str | None = None,
        batch_size: int = 16,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.model = model if model is not None else os.environ.get(ENV) or None
        self.processor = (
            processor if processor is not None else os.environ.get(ENV_PROCESSOR) or None
        )
        self.device = device
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self._dirs: tuple[Path, Path] | None = None
        self._loaded: tuple[Any, Any, Any] | None = None

    def config(self) -> dict[str, Any]:
        import transformers

        return {
            "library": f"transformers {transformers.__version__}",
            "model": str(self.model or MODEL_REPO),
            "processor": str(self.processor or PROCESSOR_REPO),
            "convention": "exp(logit_scale) * cos(E_image_i, E_text_i), mean over samples "
            "(yuvalkirstain/PickScore)",
            "preprocess": "uint8 -> PIL RGB -> CLIPImageProcessor, PIL backend (bicubic resize "
            "of the shortest side, center crop, /255, OpenAI mean/std)",
            "text": f"CLIP tokenizer, padded per batch, truncated at {MAX_TOKENS}",
            "dtype": "float32",
        }

    def dirs(self) -> tuple[Path, Path]:
        """(model dir, processor dir), downloaded on first use."""
        if self._dirs is None:
            what = "pickscore"
            self._dirs = (
                hf.resolve_dir(
                    self.model, MODEL_REPO, what=what, model=True, env=ENV, cache_dir=self.cache_dir
                ),
                hf.resolve_dir(
                    self.processor,
                    PROCESSOR_REPO,
                    what=what,
                    model=False,
                    env=ENV_PROCESSOR,
                    cache_dir=self.cache_dir,
                ),
            )
        return self._dirs

    def check(self, backbone=None) -> None:
        self.dirs()

    def load(self, device: str | torch.device = "cpu") -> tuple[Any, Any, Any]:
        """(CLIPModel, tokenizer, PIL image processor), built once."""
        if self._loaded is None:
            model_dir, processor_dir = self.dirs()
            self._loaded = (hf.load_clip(model_dir, device), *hf.load_processor(processor_dir))
        return self._loaded

    @torch.inference_mode()
    def score_batch(self, model: Any, images: Tensor, texts: list[str]) -> Tensor:
        clip, tokenizer, image_processor = model
        dev = hf.model_device(clip)
        tokens = tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(dev)
        img = hf.embedding(
            clip.get_image_features(pixel_values=hf.pixel_values(image_processor, images, dev))
        )
        txt = hf.embedding(clip.get_text_features(**tokens))
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
        return (clip.logit_scale.exp() * (img * txt).sum(-1)).to("cpu", torch.float64)


__all__ = ["PickScore"]
