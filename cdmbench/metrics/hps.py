"""HPSv2 / HPSv2.1 human-preference score of (prompt, image) pairs (Wu et al. 2023,
arXiv 2306.09341; tgxs002/HPSv2).

Model: open_clip ``ViT-H-14`` with the fine-tuned HPS checkpoint ``xswu/HPSv2``
``HPS_v2.1_compressed.pt`` (``version="v2.0"``: ``HPS_v2_compressed.pt``); the checkpoint holds
the whole CLIP, so no LAION backbone weights are needed. Per pair ``s_i = <E_image_i, E_text_i>``
of the normalised embeddings, without ``logit_scale`` (``hpsv2.img_score.score``); the value is
the mean over samples.

Preprocessing (the hpsv2 package's ``preprocess_val`` with ``light_augmentation``, and the
official CDM evaluation, byliutao/cdm ``cdm/rewards/hpsv2_scorer.py``, batched): the image as a
float tensor in [0, 1]; its longest side resized to 224 with torchvision (bicubic, antialiased)
and the other side padded with black to 224 (``ResizeMaxSize``; an image already 224 on its
longest side is left as is), then OpenAI mean/std.

Weights: ``checkpoint=FILE`` / ``$CDMBENCH_HPSV2``, else the Hugging Face cache, else a
download; ``checkpoint=None`` with ``pretrained=False`` builds random weights (tests).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdmbench.errors import MissingWeightsError, UserError
from cdmbench.io import fit_state, load_torch_file
from cdmbench.metrics.base import PerSampleMetric, Value
from cdmbench.weights import hub_file

REPO = "xswu/HPSv2"
FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
ENV = "CDMBENCH_HPSV2"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _resized_shape(height: int, width: int, max_size: int) -> tuple[int, int] | None:
    """``ResizeMaxSize``'s target (h, w), or None where the scale is 1 (no resize, no pad)."""
    scale = max_size / float(max(height, width))
    if scale == 1.0:
        return None
    return (round(height * scale), round(width * scale))


def _padding(new: tuple[int, int], max_size: int) -> list[int]:
    pad_h, pad_w = max_size - new[0], max_size - new[1]
    return [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]


def preprocess(images: Tensor, size: int) -> Tensor:
    """uint8 [n, C, H, W] -> normalised float32 [n, 3, size, size], HPSv2's way (see module)."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 [N, 1|3, H, W], got {images.dtype} {images.shape}")
    x = images.expand(-1, 3, -1, -1).to(torch.float32) / 255.0
    new = _resized_shape(x.shape[-2], x.shape[-1], size)
    if new is not None:
        x = F.resize(x, list(new), InterpolationMode.BICUBIC, antialias=True)
        x = F.pad(x, padding=_padding(new, size), fill=0)
    return F.normalize(x, OPENAI_MEAN, OPENAI_STD)


class HPSv2(PerSampleMetric):
    """HPSv2.1 (or v2.0): CLIP ViT-H/14 fine-tuned on human preferences, image-prompt score."""

    name = "hpsv2"
    values = {
        "hpsv2": Value(
            higher_is_better=True,
            tolerance="0.005",
            description="HPSv2.1 score (cosine of the fine-tuned CLIP ViT-H/14), mean",
        )
    }

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        *,
        version: str = "v2.1",
        model: str = "ViT-H-14",
        pretrained: bool = True,
        device: str | None = None,
        batch_size: int = 16,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if version not in FILES:
            raise ValueError(f"HPS version must be one of {', '.join(FILES)}, got {version!r}")
        env = os.environ.get(ENV) or None
        self.checkpoint = checkpoint if checkpoint is not None else env
        self.version = version
        self.model_name = model
        self.pretrained = pretrained
        self.device = device
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self._file: Path | None = None
        self._loaded: tuple[Any, Any, int] | None = None

    def config(self) -> dict[str, Any]:
        import open_clip

        weights = str(self.checkpoint or f"{REPO}/{FILES[self.version]}")
        return {
            "library": f"open_clip {open_clip.__version__}",
            "model": self.model_name,
            "version": self.version,
            "weights": weights if self.pretrained else "none (random weights)",
            "convention": "<E_image_i, E_text_i> of normalised embeddings, no logit scale "
            "(hpsv2.img_score), mean over samples",
            "preprocess": "uint8 / 255 -> ResizeMaxSize(224): longest side, torchvision "
            "bicubic antialias; pad black -> OpenAI mean/std (hpsv2 preprocess_val)",
            "text": f"open_clip.get_tokenizer('{self.model_name}'), context 77, truncated",
            "dtype": "float32",
        }

    def file(self) -> Path | None:
        """The HPS checkpoint, downloaded on first use; None for random weights."""
        if not self.pretrained:
            return None
        if self._file is None:
            if self.checkpoint is not None:
                path = Path(self.checkpoint)
                if not path.is_file():
                    raise MissingWeightsError(
                        f"hpsv2: checkpoint {path} does not exist; put "
                        f"`hf download {REPO} {FILES[self.version]}` there"
                    )
                self._file = path
            else:
                self._file = hub_file(
                    REPO, FILES[self.version], what="hpsv2", cache_dir=self.cache_dir
                )
        return self._file

    def check(self, backbone=None) -> None:
        import open_clip

        if open_clip.get_model_config(self.model_name) is None:
            raise ValueError(f"unknown open_clip model '{self.model_name}'")
        self.file()

    def load(self, device: str | torch.device = "cpu") -> tuple[Any, Any, int]:
        """(open_clip model, tokenizer, input size), built once."""
        if self._loaded is None:
            import open_clip

            model = open_clip.create_model(self.model_name, pretrained=None, device="cpu")
            path = self.file()
            if path is None:
                warnings.warn(f"hpsv2: {self.model_name} with random weights", stacklevel=2)
            else:
                fix = "fetch the HPS checkpoint again (or set $CDMBENCH_HPSV2)"
                state = load_torch_file(path, "hpsv2 checkpoint", fix)
                if not isinstance(state, dict):
                    raise UserError(f"hpsv2 checkpoint {path} holds no state dict; {fix}")
                fit_state(model, state.get("state_dict", state), path, "hpsv2 checkpoint", fix)
            size = model.visual.image_size
            size = size[0] if isinstance(size, tuple | list) else size
            tokenizer = open_clip.get_tokenizer(self.model_name)
            self._loaded = (model.eval().to(device), tokenizer, int(size))
        return self._loaded

    @torch.inference_mode()
    def score_batch(self, model: Any, images: Tensor, texts: list[str]) -> Tensor:
        clip, tokenizer, size = model
        dev = next(clip.parameters()).device
        x = preprocess(images, size).to(dev)
        img = clip.encode_image(x, normalize=True)
        txt = clip.encode_text(tokenizer(texts).to(dev), normalize=True)
        return (img * txt).sum(-1).to("cpu", torch.float64)


__all__ = ["HPSv2", "preprocess"]
