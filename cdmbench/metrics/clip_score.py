"""CLIP score of (prompt, image) pairs with open_clip (Hessel et al. 2021, torchmetrics convention).

Per sample ``s_i = 100 * cos(E_I_i, E_C_i)`` between the CLIP image embedding of image i and
the text embedding of its prompt; the reported value is ``max(mean_i s_i, 0)``. This is exactly
what torchmetrics' ``CLIPScore`` computes (its ``compute`` clamps the running mean at zero, not
each sample; its docstring's ``max(100 * cos, 0)`` reads per sample but for real CLIP models
the two never differ, as image-caption cosines are positive).

Model and weights: any open_clip architecture and pretrained tag (default ``ViT-L-14`` /
``openai``, the model torchmetrics' default ``openai/clip-vit-large-patch14`` is). The tag's
own settings are applied as open_clip's pretrained config lists them: preprocessing (mean,
std, interpolation, resize mode) and QuickGELU (OpenAI's weights were trained with QuickGELU,
which open_clip's plain ``ViT-L-14`` config does not use). ``pretrained`` may instead be a
local checkpoint file, loaded into ``model`` as is (name the ``-quickgelu`` variant for OpenAI
weights then); ``pretrained=None`` builds random weights and is for tests only.

``model`` may also be ``hf-hub:org/repo``, open_clip's schema for a model whose config
(``open_clip_config.json``: architecture and preprocessing) and weights live in a Hugging Face
repo; ``pretrained`` is ignored then, as open_clip ignores it.

Weights are resolved as open_clip resolves them: the Hugging Face cache (or ``cache_dir``;
``~/.cache/clip`` for a tag that only has a URL) first, else open_clip's own download
(:func:`open_clip.pretrained.download_pretrained`) when the machine is online. Offline
(``HF_HUB_OFFLINE=1``) or with the host unreachable, :meth:`ClipScore.check` raises
:class:`MissingWeightsError` in seconds, before any model is built.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdmbench.errors import MissingWeightsError
from cdmbench.metrics.base import PerSampleMetric, Value
from cdmbench.weights import cached_hub_file, download, hub_endpoint, hub_file

CONVENTION = "max(mean_i 100*cos(E_image_i, E_text_i), 0) (torchmetrics CLIPScore)"


def clip_score_from_embeddings(img_emb: Tensor, txt_emb: Tensor) -> Tensor:
    """Per-sample ``100 * cos(img_emb[i], txt_emb[i])``, as torchmetrics' ``_clip_score_update``."""
    if img_emb.shape != txt_emb.shape or img_emb.ndim != 2:
        raise ValueError(
            f"need two [N, D] embeddings, got {tuple(img_emb.shape)} and {tuple(txt_emb.shape)}"
        )
    img = img_emb / img_emb.norm(p=2, dim=-1, keepdim=True)
    txt = txt_emb / txt_emb.norm(p=2, dim=-1, keepdim=True)
    return 100 * (img * txt).sum(dim=-1)


def aggregate_clip_score(scores: Tensor) -> float:
    """torchmetrics' ``CLIPScore.compute``: the mean of the per-sample scores, clamped at 0."""
    mean = scores.sum(0) / scores.shape[0]
    return float(torch.max(mean, torch.zeros_like(mean)))


def uint8_to_pil(images: Tensor) -> list[Any]:
    """uint8 [N, C, H, W] with C = 1 (grey, repeated to RGB) or 3 -> RGB PIL images."""
    from PIL import Image

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected uint8 [N, 1|3, H, W] images, got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    arr = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


def _hub_cache_dir(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


class ClipScore(PerSampleMetric):
    """CLIP score, 100 x image-prompt cosine in open_clip (Hessel et al. 2021; torchmetrics)."""

    name = "clip_score"
    values = {"clip_score": Value(higher_is_better=True, tolerance="1.0")}
    needs = ("images", "prompts")

    def __init__(
        self,
        model: str = "ViT-L-14",
        pretrained: str | None = "openai",
        *,
        device: str | None = None,
        batch_size: int = 32,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.model_name = model
        self.pretrained = pretrained
        self.device = device
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self._loaded: tuple[Any, Any, Any] | None = None  # (model, preprocess, tokenizer)

    # ---- what the weights are and where they are
    def _is_file(self) -> bool:
        p = self.pretrained or ""
        return (
            os.path.isfile(p) or os.sep in p or p.endswith((".pt", ".pth", ".bin", ".safetensors"))
        )

    def _hub_model(self) -> str | None:
        """The repo of an ``hf-hub:org/repo`` model name, else None."""
        prefix = "hf-hub:"
        return self.model_name[len(prefix) :] if self.model_name.startswith(prefix) else None

    def _hub_config(self) -> dict[str, Any]:
        """An ``hf-hub:`` model's ``open_clip_config.json`` (cache, else downloaded)."""
        import json

        repo = self._hub_model()
        path = hub_file(
            repo,
            "open_clip_config.json",
            what="clip_score",
            cache_dir=self.cache_dir,
            hint=self._fetch_hint(),
        )
        return json.loads(path.read_text(encoding="utf-8"))

    def _pretrained_cfg(self) -> dict[str, Any]:
        """open_clip's config for the pretrained tag ({} for a file or random weights; an
        ``hf-hub:`` model's preprocessing config)."""
        import open_clip

        if self._hub_model():
            return dict(self._hub_config().get("preprocess_cfg", {}))
        if open_clip.get_model_config(self.model_name) is None:
            raise ValueError(
                f"unknown open_clip model '{self.model_name}' (see open_clip.list_models())"
            )
        if not self.pretrained or self._is_file():
            return {}
        cfg = open_clip.get_pretrained_cfg(self.model_name, self.pretrained)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(self.model_name)
            raise ValueError(
                f"unknown open_clip pretrained tag '{self.pretrained}' for "
                f"{self.model_name} (known: {', '.join(tags) or 'none'})"
            )
        return cfg

    def _fetch_hint(self) -> str:
        tag = "" if self._hub_model() else f", pretrained='{self.pretrained}'"
        return (
            f'fetch them on a machine with network with `python -c "import open_clip; '
            f"open_clip.create_model('{self.model_name}'{tag})\"`"
            f" (they go to the Hugging Face cache, {_hub_cache_dir(self.cache_dir)}) "
            "or pass pretrained=/path/to/checkpoint"
        )

    def checkpoint(self) -> str | None:
        """Local checkpoint file for the weights (None: random): from the cache where open_clip
        keeps them, else downloaded by open_clip's own mechanism when the machine is online."""
        from open_clip.pretrained import (
            HF_WEIGHTS_NAME,
            _get_safe_alternatives,
            download_pretrained,
            download_pretrained_from_hf,
        )

        if repo := self._hub_model():
            self._hub_config()  # the architecture comes first
            for name in [*_get_safe_alternatives(HF_WEIGHTS_NAME), HF_WEIGHTS_NAME]:
                if (hit := cached_hub_file(repo, name, cache_dir=self.cache_dir)) is not None:
                    return str(hit)
            return download(
                "clip_score",
                f"open_clip weights {repo}",
                hub_endpoint(),
                self._fetch_hint(),
                lambda: download_pretrained_from_hf(repo, cache_dir=self.cache_dir),
            )
        if not self.pretrained:
            return None
        if self._is_file():
            if not os.path.isfile(self.pretrained):
                raise MissingWeightsError(
                    f"clip_score: checkpoint {self.pretrained} does not "
                    f"exist; put the open_clip {self.model_name} weights "
                    "there"
                )
            return self.pretrained
        cfg = self._pretrained_cfg()
        if cfg.get("file"):
            if os.path.isfile(cfg["file"]):
                return str(cfg["file"])
        elif cfg.get("hf_hub"):
            model_id, filename = os.path.split(cfg["hf_hub"])
            filename = filename or HF_WEIGHTS_NAME
            for name in [*_get_safe_alternatives(filename), filename]:  # open_clip's order
                if (hit := cached_hub_file(model_id, name, cache_dir=self.cache_dir)) is not None:
                    return str(hit)
        elif cfg.get("url"):
            root = Path(self.cache_dir or Path("~/.cache/clip").expanduser())
            target = root / os.path.basename(cfg["url"])
            if target.is_file():
                return str(target)
        where = cfg.get("hf_hub") or cfg.get("url") or cfg.get("file")
        source = f"open_clip weights {self.model_name}/{self.pretrained} ({where})"
        if cfg.get("file"):  # a file the pretrained table names: nothing to download
            raise MissingWeightsError(f"clip_score: {source} not found; {self._fetch_hint()}")
        url = hub_endpoint() if cfg.get("hf_hub") else cfg["url"]
        cache = None if self.cache_dir is None else str(self.cache_dir)
        return download(
            "clip_score",
            source,
            url,
            self._fetch_hint(),
            lambda: download_pretrained(cfg, cache_dir=cache),
        )

    # ---- the plugin interface
    def config(self) -> dict[str, Any]:
        import open_clip
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        cfg = self._pretrained_cfg()
        model_cfg = open_clip.get_model_config(self.model_name)
        pre = merge_preprocess_dict(PreprocessCfg(), cfg)
        size = model_cfg["vision_cfg"].get("image_size", pre["size"])
        pre["size"] = [size, size] if isinstance(size, int) else list(size)  # [H, W]
        pre = {k: list(v) if isinstance(v, tuple) else v for k, v in pre.items()}
        return {
            "library": f"open_clip {open_clip.__version__}",
            "model": self.model_name,
            "pretrained": self.pretrained if self.pretrained else "none (random weights)",
            "quick_gelu": bool(cfg.get("quick_gelu") or model_cfg.get("quick_gelu")),
            "convention": CONVENTION,
            "preprocess": {
                **pre,
                "steps": "uint8 -> PIL RGB -> open_clip eval transform "
                "(resize shortest side, center crop, to tensor, normalize)",
            },
            "text": f"open_clip.get_tokenizer('{self.model_name}'), "
            f"context {model_cfg['text_cfg'].get('context_length', 77)}, truncated",
            "dtype": "float32",
        }

    def check(self, backbone=None) -> None:
        self.checkpoint()
        import open_clip

        try:
            open_clip.get_tokenizer(self.model_name)
        except Exception as e:  # HF tokenizers (non-OpenAI text towers) come from the hub
            raise MissingWeightsError(
                f"clip_score: the tokenizer for {self.model_name} is not on "
                f"this machine ({type(e).__name__}); "
                f"{self._fetch_hint()}"
            ) from None

    def create_kwargs(self) -> dict[str, Any]:
        """open_clip.create_model_and_transforms arguments: the local file and the tag's settings."""
        cfg = self._pretrained_cfg()
        return {
            "pretrained": self.checkpoint(),
            "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
            "image_mean": cfg.get("mean"),
            "image_std": cfg.get("std"),
            "image_interpolation": cfg.get("interpolation"),
            "image_resize_mode": cfg.get("resize_mode"),
        }

    def load(self, device: str | torch.device = "cpu") -> tuple[Any, Any, Any]:
        """(model, preprocess, tokenizer), built once; weights only from local files."""
        if self._loaded is None:
            import open_clip

            kwargs = self.create_kwargs()
            if kwargs["pretrained"] is None:
                warnings.warn(
                    f"clip_score: {self.model_name} with random weights (pretrained=None)",
                    stacklevel=2,
                )
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.model_name, device=device, **kwargs
            )
            self._loaded = (model.eval(), preprocess, open_clip.get_tokenizer(self.model_name))
        return self._loaded

    @torch.inference_mode()
    def score_batch(self, model: tuple[Any, Any, Any], images: Tensor, texts: list[str]) -> Tensor:
        """Per-sample ``100 * cos`` of images[i] (uint8 [n, C, H, W]) and texts[i], float32 CPU."""
        net, preprocess, tokenizer = model
        dev = next(net.parameters()).device
        x = torch.stack([preprocess(p) for p in uint8_to_pil(images)]).to(dev)
        tokens = tokenizer(texts).to(dev)
        img = net.encode_image(x).float()
        txt = net.encode_text(tokens).float()
        return clip_score_from_embeddings(img, txt).cpu()

    def scores(
        self, images: Tensor, texts: list[str], device: str | torch.device = "cpu"
    ) -> Tensor:
        """Per-sample ``100 * cos`` of images[i] (uint8 [N, C, H, W]) and texts[i], float32 CPU."""
        return super().scores(images, texts, device).float()

    def reduce(self, scores: Tensor) -> dict[str, float]:
        """torchmetrics' aggregate of the (float32) per-sample scores."""
        return {"clip_score": aggregate_clip_score(scores.float())}


__all__ = [
    "CONVENTION",
    "ClipScore",
    "aggregate_clip_score",
    "clip_score_from_embeddings",
    "uint8_to_pil",
]
