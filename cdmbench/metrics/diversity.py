"""Intra-prompt diversity: mean pairwise LPIPS and the Vendi score of the images of each prompt,
averaged over prompts, as the official CDM evaluation computes them (byliutao/cdm
``cdm/rewards/diversity_scorer.py``).

- ``intra_lpips``: LPIPS v0.1 (Zhang et al. 2018; the ``lpips`` package, AlexNet trunk, its
  shipped linear calibration) between every pair i < j of a prompt's k images, inputs scaled
  to [-1, 1]; a prompt's score is the mean over its k(k-1)/2 pairs.
- ``vendi``: the Vendi score (Friedman & Dieng 2023, vertaix/Vendi-Score) ``exp(-sum_i l_i log
  l_i)`` over the eigenvalues l of ``K / k``, where ``K`` is the cosine similarity, clipped to
  [0, 1], of the L2-normalised, globally average-pooled last AlexNet feature map (relu5) of the
  LPIPS trunk, applied to the [-1, 1] image without LPIPS' scaling layer.

Images are read at their stored size (no resize), uint8 / 255 (the CDM code scores the float
images before quantisation). The trunk's ImageNet weights come from torchvision's download
(``torch.hub`` cache, ``alexnet-owt-7be5be79.pth``) or ``backbone=FILE`` /
``$CDMBENCH_LPIPS_ALEXNET``; ``pretrained=False`` leaves the trunk random (tests).
"""

from __future__ import annotations

import os
import warnings
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cdmbench.errors import MissingWeightsError, UserError
from cdmbench.io import load_torch_file
from cdmbench.metrics.base import PerPromptMetric, Value
from cdmbench.weights import url_file

ENV = "CDMBENCH_LPIPS_ALEXNET"
INSTALL = 'pip install -e ".[diversity]"'
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


def vendi_from_kernel(K: Tensor) -> float:
    """``vendi_score.vendi.score_K`` (q = 1, uniform weights) in float64."""
    w = torch.linalg.eigvalsh(K.to(torch.float64) / K.shape[0])
    w = w[w > 0]
    return float(torch.exp(-(w * torch.log(w)).sum()))


def _to_signed(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 [k, 1|3, H, W], got {images.dtype} {images.shape}")
    return images.expand(-1, 3, -1, -1).to(torch.float32) / 255.0 * 2.0 - 1.0


class _LpipsBase(PerPromptMetric):
    """Loads the ``lpips`` package's AlexNet LPIPS; both diversity metrics use it."""

    def __init__(
        self,
        backbone: str | os.PathLike | None = None,
        *,
        pretrained: bool = True,
        device: str | None = None,
        batch_size: int = 64,
    ) -> None:
        self.backbone = backbone if backbone is not None else os.environ.get(ENV) or None
        self.pretrained = pretrained
        self.device = device
        self.batch_size = batch_size
        self._file: Path | None = None
        self._model: Any = None

    def _common_config(self) -> dict[str, Any]:
        try:
            from importlib.metadata import version

            lib = f"lpips {version('lpips')}"
        except Exception:
            lib = "lpips (not installed)"
        return {
            "library": lib,
            "network": "LPIPS v0.1, AlexNet trunk, package's linear weights",
            "trunk_weights": str(self.backbone or ALEXNET_URL)
            if self.pretrained
            else "none (random trunk)",
            "input": "uint8 / 255 * 2 - 1, stored size",
            "reference": "byliutao/cdm cdm/rewards/diversity_scorer.py",
        }

    def trunk_file(self) -> Path | None:
        """AlexNet's ImageNet weights: ``backbone``, else the torch hub cache, else downloaded."""
        if not self.pretrained:
            return None
        if self._file is None:
            if self.backbone is not None:
                path = Path(self.backbone)
                if not path.is_file():
                    raise MissingWeightsError(
                        f"{self.name}: AlexNet weights {path} do not exist; put {ALEXNET_URL} there"
                    )
            else:
                path = url_file(
                    ALEXNET_URL,
                    Path(torch.hub.get_dir()) / "checkpoints" / Path(ALEXNET_URL).name,
                    what=f"{self.name}: torchvision's AlexNet weights",
                )
            self._file = path
        return self._file

    def check(self, backbone=None) -> None:
        try:
            import lpips  # noqa: F401
        except ImportError:
            raise UserError(f"{self.name} needs the lpips package: {INSTALL}") from None
        self.trunk_file()

    def load(self, device: str | torch.device = "cpu") -> Any:
        """``lpips.LPIPS(net="alex")`` in eval mode, trunk weights from :meth:`trunk_file`."""
        if self._model is None:
            import lpips

            path = self.trunk_file()
            if path is None:
                warnings.warn(f"{self.name}: LPIPS with a random AlexNet trunk", stacklevel=2)
            with warnings.catch_warnings():  # torchvision's notes on its `pretrained` argument
                warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
                model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
            if path is not None:
                features = load_torch_file(
                    path, f"{self.name}: AlexNet weights", f"fetch {ALEXNET_URL} again"
                )
                if not isinstance(features, dict):
                    raise UserError(f"{self.name}: AlexNet weights {path} hold no state dict")
                # lpips' alexnet slices hold torchvision's alexnet.features[0..11]
                sliced = {}
                for name, slice_ in model.net.named_children():
                    for idx in slice_._modules:
                        for p in ("weight", "bias"):
                            key = f"features.{idx}.{p}"
                            if key in features:
                                sliced[f"{name}.{idx}.{p}"] = features[key]
                missing = set(model.net.state_dict()) - set(sliced)
                if missing:
                    raise MissingWeightsError(
                        f"{self.name}: {path} is not torchvision's AlexNet state dict "
                        f"(no {sorted(missing)[0]})"
                    )
                model.net.load_state_dict(sliced)
            self._model = model.eval().to(device)
            for p in self._model.parameters():
                p.requires_grad_(False)
        return self._model


class IntraLPIPS(_LpipsBase):
    """Mean pairwise LPIPS (AlexNet) between the images of each prompt, averaged over prompts."""

    name = "intra_lpips"
    values = {
        "intra_lpips": Value(
            higher_is_better=True,
            tolerance="0.02",
            description="mean pairwise LPIPS (AlexNet) within a prompt, mean over prompts",
        )
    }

    def config(self) -> dict[str, Any]:
        return {
            **self._common_config(),
            "convention": "mean over prompts of the mean LPIPS over pairs i < j",
        }

    @torch.inference_mode()
    def score_group(self, model: Any, images: Tensor, text: str) -> float:
        dev = next(model.parameters()).device
        x = _to_signed(images)
        pairs = list(combinations(range(x.shape[0]), 2))
        dists = []
        for s in range(0, len(pairs), self.batch_size):
            chunk = pairs[s : s + self.batch_size]
            a = x[[i for i, _ in chunk]].to(dev)
            b = x[[j for _, j in chunk]].to(dev)
            dists.append(model(a, b).reshape(-1).to("cpu", torch.float64))
        return float(torch.cat(dists).mean())


class Vendi(_LpipsBase):
    """Vendi score of each prompt's images in LPIPS-AlexNet features, averaged over prompts."""

    name = "vendi"
    values = {
        "vendi": Value(
            higher_is_better=True,
            tolerance="0.1",
            description="Vendi score (effective number of distinct images) per prompt, "
            "LPIPS-AlexNet relu5 features, mean over prompts",
        )
    }

    def config(self) -> dict[str, Any]:
        return {
            **self._common_config(),
            "features": "AlexNet relu5 of the [-1, 1] image (no LPIPS scaling), global "
            "average pool, L2 normalised",
            "convention": "exp(entropy of eig(K / k)), K = clip(cos, 0, 1), q = 1; mean over "
            "prompts (vendi_score.vendi.score_K)",
        }

    @torch.inference_mode()
    def score_group(self, model: Any, images: Tensor, text: str) -> float:
        dev = next(model.parameters()).device
        x = _to_signed(images)
        feats = []
        for s in range(0, x.shape[0], self.batch_size):
            last = model.net(x[s : s + self.batch_size].to(dev))[-1]
            feats.append(F.adaptive_avg_pool2d(last, 1).flatten(1).to("cpu", torch.float32))
        f = F.normalize(torch.cat(feats), p=2, dim=1)
        return vendi_from_kernel((f @ f.T).clamp(0.0, 1.0))


__all__ = ["IntraLPIPS", "Vendi", "vendi_from_kernel"]
