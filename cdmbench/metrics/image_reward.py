"""ImageReward-v1.0 human-preference reward of (prompt, image) pairs (Xu et al. 2023).

The model and scoring steps are the ``image-reward`` package's (ImageReward-v1.0: BLIP ViT-L
image encoder, BERT text encoder cross-attending to the image, MLP head, reward normalised as
``(r - 0.16717) / 1.03334``); the reported value is the mean reward over samples, each image
scored against the prompt it was generated for.

Install (image-reward pins timm==0.6.13, which conflicts with open_clip, and its code predates
transformers 5; :mod:`cdmbench.metrics._imagereward_compat` bridges that)::

    pip install -e ".[reward]"
    pip install --no-deps image-reward==1.5

It needs nothing beyond cdmbench's own dependencies and timm (fairscale, OpenAI ``clip`` and
``datasets``, which the package's other modules import, are not needed for scoring).

Weights: the first of these that has them is used:

- ``weights=DIR`` or ``$CDMBENCH_IMAGEREWARD``: a directory with ``ImageReward.pt`` and
  ``med_config.json`` (``hf download THUDM/ImageReward ImageReward.pt med_config.json
  --local-dir DIR``); never completed from the hub;
- ``~/.cache/ImageReward``, where ``ImageReward.load`` downloads them;
- the Hugging Face cache (``cache_dir``, default ``$HF_HUB_CACHE``) for ``THUDM/ImageReward``,
  downloaded there with ``hf_hub_download`` (the package's own mechanism) on first use when
  the machine is online.

BLIP's text tokenizer is ``bert-base-uncased``: ``tokenizer=DIR``, else ``DIR/bert-base-uncased``
next to the weights, else the Hugging Face cache (where the package's own loader puts it),
downloaded there on first use. Offline (``HF_HUB_OFFLINE=1``) or with the hub unreachable,
:meth:`ImageRewardScore.check` raises :class:`MissingWeightsError` in seconds.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdmbench.errors import MissingWeightsError
from cdmbench.metrics.base import PerSampleMetric, Value
from cdmbench.weights import cached_hub_file, hub_file

ENV = "CDMBENCH_IMAGEREWARD"
REPO = "THUDM/ImageReward"
FILES = ("ImageReward.pt", "med_config.json")
TOKENIZER_REPOS = ("bert-base-uncased", "google-bert/bert-base-uncased")
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json")  # what BertTokenizer reads
INSTALL = 'pip install -e ".[reward]" && pip install --no-deps image-reward==1.5'


def _cached(repo: str, filename: str, cache_dir: str | os.PathLike | None) -> Path | None:
    """A file from the Hugging Face cache, looked up locally (no network)."""
    return cached_hub_file(repo, filename, cache_dir=cache_dir)


class ImageRewardScore(PerSampleMetric):
    """ImageReward-v1.0 reward of each image for its prompt, averaged (Xu et al. 2023)."""

    name = "image_reward"
    values = {"image_reward": Value(higher_is_better=True, tolerance="0.1")}
    needs = ("images", "prompts")

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        *,
        device: str | None = None,
        batch_size: int = 16,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.weights = weights if weights is not None else os.environ.get(ENV) or None
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self._model: Any = None

    # ---- where things are
    def files(self) -> tuple[Path, Path]:
        """(ImageReward.pt, med_config.json) on this machine, else MissingWeightsError."""
        fetch = f"hf download {REPO} {' '.join(FILES)} --local-dir DIR"
        if self.weights:
            d = Path(self.weights).expanduser()
            missing = [f for f in FILES if not (d / f).is_file()]
            if missing:
                raise MissingWeightsError(
                    f"image_reward: {' and '.join(missing)} not in {d}; "
                    f"fetch them with `{fetch}` using DIR={d}"
                )
            return d / FILES[0], d / FILES[1]
        home = Path("~/.cache/ImageReward").expanduser()
        if all((home / f).is_file() for f in FILES):
            return home / FILES[0], home / FILES[1]
        hits = [_cached(REPO, f, self.cache_dir) for f in FILES]
        if hits[0] is not None and hits[1] is not None:
            return hits[0], hits[1]
        hint = f"run `{fetch}` and set {ENV}=DIR"
        got = [
            hub_file(REPO, f, what="image_reward", cache_dir=self.cache_dir, hint=hint)
            for f in FILES
        ]
        return got[0], got[1]

    def tokenizer_dir(self) -> Path:
        """Local directory of the bert-base-uncased tokenizer, else MissingWeightsError."""
        if self.tokenizer:
            d = Path(self.tokenizer).expanduser()
        else:
            try:
                d = self.files()[0].parent / "bert-base-uncased"
            except MissingWeightsError:
                d = Path("DIR") / "bert-base-uncased"
        if (d / "vocab.txt").is_file() or (d / "tokenizer.json").is_file():
            return d
        fetch = (
            "run `hf download bert-base-uncased vocab.txt tokenizer.json tokenizer_config.json "
            f"--local-dir {d}`"
            + (" (DIR: the ImageReward weights directory)" if d.parts[0] == "DIR" else "")
        )
        if self.tokenizer:  # a directory given is never completed from the hub
            raise MissingWeightsError(
                f"image_reward needs BLIP's bert-base-uncased tokenizer: {fetch}"
            )
        for repo in TOKENIZER_REPOS:
            for f in ("tokenizer.json", "vocab.txt"):
                if (hit := _cached(repo, f, self.cache_dir)) is not None:
                    return hit.parent
        got = [
            hub_file(
                TOKENIZER_REPOS[0],
                f,
                what="image_reward (BLIP's bert-base-uncased tokenizer)",
                cache_dir=self.cache_dir,
                hint=fetch,
            )
            for f in TOKENIZER_FILES
        ]
        return got[0].parent

    # ---- the plugin interface
    def config(self) -> dict[str, Any]:
        from cdmbench.metrics import _imagereward_compat as compat

        try:
            version = metadata.version("image-reward")
        except metadata.PackageNotFoundError:
            version = "not installed"
        return {
            "library": f"image-reward {version}",
            "model": "ImageReward-v1.0",
            "weights": f"huggingface.co/{REPO} {FILES[0]} + {FILES[1]}",
            "text": f"BLIP bert-base-uncased tokenizer, max_length {compat.MAX_TEXT_LEN}, "
            "padded, truncated",
            "preprocess": f"uint8 -> PIL RGB -> resize {compat.IMAGE_SIZE} bicubic, center crop "
            f"{compat.IMAGE_SIZE}, to tensor, normalize (CLIP mean/std)",
            "convention": f"mean_i (MLP(BLIP(image_i, prompt_i)) - {compat.REWARD_MEAN}) / "
            f"{compat.REWARD_STD}",
            "dtype": "float32",
        }

    def check(self, backbone=None) -> None:
        if self._model is not None:
            return
        from importlib.util import find_spec

        for module, package in [("ImageReward", "image-reward"), ("timm", "timm")]:
            if find_spec(module) is None:
                raise MissingWeightsError(f"image_reward needs the {package} package: {INSTALL}")
        self.files()
        self.tokenizer_dir()

    def load(self, device: str | torch.device = "cpu") -> Any:
        """The package's ImageReward model with ImageReward-v1.0 weights, built once."""
        if self._model is None:
            self.check()
            from cdmbench.metrics import _imagereward_compat as compat

            ckpt, med_config = self.files()
            tokenizer = compat.blip_tokenizer(self.tokenizer_dir())
            self._model = compat.load_imagereward(ckpt, med_config, tokenizer, device)
        return self._model

    def score_batch(self, model: Any, images: Tensor, texts: list[str]) -> Tensor:
        """Per-sample reward of images[i] (uint8 [n, C, H, W]) for texts[i], float32 CPU."""
        from cdmbench.metrics import _imagereward_compat as compat

        return compat.score_images(model, images, texts, max(len(texts), 1))

    def reduce(self, scores: Tensor) -> dict[str, float]:
        """The mean reward, over the float32 per-sample rewards."""
        return {"image_reward": float(scores.float().mean())}


__all__ = ["ENV", "ImageRewardScore"]
