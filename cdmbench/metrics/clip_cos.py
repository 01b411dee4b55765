"""CLIP score as the official CDM evaluation reports it: the plain cosine, not x100.

byliutao/cdm ``cdm/rewards/clip_scorer.py`` (after RE-N-Y/imscore): transformers ``CLIPModel``
``openai/clip-vit-large-patch14``; the image, as a float tensor in [0, 1], goes through
torchvision ``Resize`` (shortest side to the processor's size, bilinear, antialiased),
``CenterCrop`` and ``Normalize`` built from the processor's config; the prompt is padded to 77
tokens and truncated; per pair ``s_i = logits_per_image[i, i] / 100 = exp(logit_scale) *
cos(E_image_i, E_text_i) / 100`` (OpenAI's ``exp(logit_scale)`` is 100, so this is the cosine).
The reported value is the plain mean over samples (no clamp). ``clip_score`` keeps torchmetrics'
convention (``max(mean 100 * cos, 0)``, open_clip, PIL preprocessing); the two differ in scale
and slightly in preprocessing.

Weights: ``model=DIR`` / ``$CDMBENCH_CLIP`` (model and processor files, as ``save_pretrained``
or ``hf download`` write them), else the Hugging Face cache, else a download.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdmbench.metrics import _hf_clip as hf
from cdmbench.metrics.base import PerSampleMetric, Value

REPO = "openai/clip-vit-large-patch14"
ENV = "CDMBENCH_CLIP"
CONVENTION = "mean_i exp(logit_scale) * cos(E_image_i, E_text_i) / 100 (byliutao/cdm ClipScorer)"


def _size(size: Any) -> Any:
    """``get_size`` of the CDM code: an int, (h, w), or the shortest edge."""
    if isinstance(size, int):
        return (size, size)
    if "height" in size and "width" in size:
        return (size["height"], size["width"])
    if "shortest_edge" in size:
        return size["shortest_edge"]
    raise ValueError(f"invalid size: {size}")


def image_transform(image_processor: Any) -> Any:
    """The CDM evaluation's tensor transform from a CLIP image processor's settings."""
    import torchvision.transforms as T

    cfg = image_processor.to_dict()
    steps = []
    if cfg.get("do_resize"):
        steps.append(T.Resize(_size(cfg.get("size"))))
    if cfg.get("do_center_crop"):
        steps.append(T.CenterCrop(_size(cfg.get("crop_size"))))
    if cfg.get("do_normalize"):
        steps.append(T.Normalize(mean=image_processor.image_mean, std=image_processor.image_std))
    return T.Compose(steps)


class ClipScoreCos(PerSampleMetric):
    """CLIP score, plain image-prompt cosine of CLIP ViT-L/14 (official CDM evaluation)."""

    name = "clip_score_cos"
    values = {
        "clip_score_cos": Value(
            higher_is_better=True,
            tolerance="0.01",
            description="CLIP ViT-L/14 image-prompt cosine (not x100), mean over samples",
        )
    }

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        device: str | None = None,
        batch_size: int = 32,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.model = model if model is not None else os.environ.get(ENV) or None
        self.device = device
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self._dir: Path | None = None
        self._loaded: tuple[Any, Any, Any] | None = None

    def config(self) -> dict[str, Any]:
        import torchvision
        import transformers

        return {
            "library": f"transformers {transformers.__version__}, "
            f"torchvision {torchvision.__version__}",
            "model": str(self.model or REPO),
            "convention": CONVENTION,
            "preprocess": "uint8 / 255 -> torchvision Resize(shortest side, bilinear, "
            "antialias) -> CenterCrop -> Normalize (OpenAI mean/std)",
            "text": "CLIP tokenizer, padded to 77, truncated",
            "dtype": "float32",
        }

    def model_dir(self) -> Path:
        if self._dir is None:
            self._dir = hf.resolve_dir(
                self.model, REPO, what="clip_score_cos", model=True, env=ENV,
                cache_dir=self.cache_dir,
            )  # fmt: skip
        return self._dir

    def check(self, backbone=None) -> None:
        self.model_dir()

    def load(self, device: str | torch.device = "cpu") -> tuple[Any, Any, Any]:
        """(CLIPModel, tokenizer, tensor transform), built once."""
        if self._loaded is None:
            path = self.model_dir()
            tokenizer, image_processor = hf.load_processor(path)
            self._loaded = (hf.load_clip(path, device), tokenizer, image_transform(image_processor))
        return self._loaded

    @torch.inference_mode()
    def score_batch(self, model: Any, images: Tensor, texts: list[str]) -> Tensor:
        clip, tokenizer, transform = model
        dev = hf.model_device(clip)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 [N, 1|3, H, W], got {images.dtype} {images.shape}")
        pixels = transform(images.expand(-1, 3, -1, -1).to(dev, torch.float32) / 255.0)
        tokens = tokenizer(
            texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        )
        img = hf.embedding(clip.get_image_features(pixel_values=pixels))
        txt = hf.embedding(clip.get_text_features(**tokens.to(dev)))
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
        return (clip.logit_scale.exp() * (img * txt).sum(-1) / 100).to("cpu", torch.float64)


__all__ = ["CONVENTION", "ClipScoreCos", "image_transform"]
