"""LAION aesthetic score of images (christophschuhmann/improved-aesthetic-predictor).

The predictor's ``MLP`` (768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout inactive at inference)
on the L2-normalised CLIP ViT-L/14 image embedding, with the SAC+LOGOS+AVA1 linear-MSE weights
(``sac+logos+ava1-l14-linearMSE.pth``; the Hugging Face copy the official CDM evaluation loads is
``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth``). The CLIP model and preprocessing are
the CDM evaluation's (byliutao/cdm ``cdm/rewards/aesthetic_scorer.py``): transformers
``CLIPModel`` ``openai/clip-vit-large-patch14`` and its processor (PIL bicubic resize of the
shortest side to 224, center crop, OpenAI mean/std). The prompt is not used. The reported value
is the mean over samples (scale about 1-10).

Weights: ``clip=DIR`` / ``$CDMBENCH_AESTHETIC_CLIP`` (a ``save_pretrained`` directory) and
``head=FILE`` / ``$CDMBENCH_AESTHETIC`` (the ``.pth`` state dict), else the Hugging Face cache,
else a download.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cdmbench.errors import MissingWeightsError
from cdmbench.io import fit_state, load_torch_file
from cdmbench.metrics import _hf_clip as hf
from cdmbench.metrics.base import PerSampleMetric, Value
from cdmbench.weights import hub_file

CLIP_REPO = "openai/clip-vit-large-patch14"
HEAD_REPO, HEAD_FILE = "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"
ENV, ENV_CLIP = "CDMBENCH_AESTHETIC", "CDMBENCH_AESTHETIC_CLIP"


class MLP(nn.Module):
    """improved-aesthetic-predictor's head (``simple_inference.py``), parameter names kept so its
    state dict loads as is."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class LaionAesthetic(PerSampleMetric):
    """LAION aesthetic predictor v2 (SAC+LOGOS+AVA1 linear MSE) on CLIP ViT-L/14 embeddings."""

    name = "aesthetic"
    values = {
        "aesthetic": Value(
            higher_is_better=True,
            tolerance="0.1",
            description="LAION aesthetic predictor (MLP on CLIP ViT-L/14), mean over samples",
        )
    }
    needs = ("images",)

    def __init__(
        self,
        clip: str | os.PathLike | None = None,
        head: str | os.PathLike | None = None,
        *,
        device: str | None = None,
        batch_size: int = 16,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.clip = clip if clip is not None else os.environ.get(ENV_CLIP) or None
        self.head = head if head is not None else os.environ.get(ENV) or None
        self.device = device
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self._files: tuple[Path, Path] | None = None
        self._loaded: tuple[Any, Any, MLP] | None = None

    def config(self) -> dict[str, Any]:
        import transformers

        return {
            "library": f"transformers {transformers.__version__}",
            "clip": str(self.clip or CLIP_REPO),
            "head": str(self.head or f"{HEAD_REPO}/{HEAD_FILE}"),
            "head_architecture": "improved-aesthetic-predictor MLP 768-1024-128-64-16-1",
            "convention": "MLP(E_image / ||E_image||), mean over samples",
            "preprocess": "uint8 -> PIL RGB -> CLIPImageProcessor, PIL backend (bicubic resize "
            "of the shortest side, center crop, /255, OpenAI mean/std)",
            "dtype": "float32",
        }

    def files(self) -> tuple[Path, Path]:
        """(CLIP model dir, head state dict), downloaded on first use."""
        if self._files is None:
            clip = hf.resolve_dir(
                self.clip,
                CLIP_REPO,
                what="aesthetic",
                model=True,
                env=ENV_CLIP,
                cache_dir=self.cache_dir,
            )
            if self.head is not None:
                head = Path(self.head)
                if not head.is_file():
                    raise MissingWeightsError(
                        f"aesthetic: head weights {head} do not exist; put "
                        f"`hf download {HEAD_REPO} {HEAD_FILE}` (or improved-aesthetic-predictor's "
                        "sac+logos+ava1-l14-linearMSE.pth) there"
                    )
            else:
                head = hub_file(HEAD_REPO, HEAD_FILE, what="aesthetic", cache_dir=self.cache_dir)
            self._files = (clip, head)
        return self._files

    def check(self, backbone=None) -> None:
        self.files()

    def load(self, device: str | torch.device = "cpu") -> tuple[Any, Any, MLP]:
        """(CLIPModel, PIL image processor, MLP head), built once."""
        if self._loaded is None:
            clip_dir, head_file = self.files()
            clip = hf.load_clip(clip_dir, device)
            image_processor = hf.load_image_processor(clip_dir)
            mlp = MLP(clip.config.projection_dim)
            fix = "fetch the LAION aesthetic head again (or set $CDMBENCH_AESTHETIC)"
            fit_state(
                mlp,
                load_torch_file(head_file, "aesthetic head", fix),
                head_file,
                "aesthetic head",
                fix,
            )
            self._loaded = (clip, image_processor, mlp.eval().to(device))
        return self._loaded

    @torch.inference_mode()
    def score_batch(self, model: Any, images: Tensor, texts: list[str]) -> Tensor:
        clip, image_processor, mlp = model
        dev = hf.model_device(clip)
        emb = hf.embedding(
            clip.get_image_features(pixel_values=hf.pixel_values(image_processor, images, dev))
        )
        emb = emb / torch.linalg.vector_norm(emb, dim=-1, keepdim=True)
        return mlp(emb).squeeze(1).to("cpu", torch.float64)


__all__ = ["MLP", "LaionAesthetic"]
