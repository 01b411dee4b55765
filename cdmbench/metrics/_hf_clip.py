"""What the metrics built on transformers' ``CLIPModel`` share (PickScore, LAION aesthetic,
the plain-cosine CLIP score): model and processor directories from a local path or the Hugging
Face hub, the PIL image processor the official code ran, and projected embeddings.

The official CDM evaluation (byliutao/cdm, ``config/requirements_eval.txt``) ran
transformers <= 4.45, whose ``CLIPProcessor`` resized with PIL (bicubic, shortest side, then
center crop); transformers 5 defaults to a torchvision backend that resizes differently, so the
PIL backend (``CLIPImageProcessorPil``, the same steps) is used explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdmbench.errors import MissingWeightsError
from cdmbench.weights import download, hub_endpoint

MODEL_FILES = ("*.json", "*.txt", "*.safetensors")  # config, tokenizer, weights
PROCESSOR_FILES = ("*.json", "*.txt")  # tokenizer and image processor only


def _missing(path: Path, patterns: tuple[str, ...]) -> list[str]:
    return [p for p in patterns if not any(path.glob(p))]


def hub_snapshot(
    repo_id: str,
    *,
    what: str,
    patterns: tuple[str, ...],
    required: tuple[str, ...],
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
) -> Path:
    """The snapshot directory of ``repo_id`` holding the files matching ``patterns``: the Hugging
    Face cache, else a download (``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` as huggingface_hub reads
    them). A model repository without safetensors weights falls back to ``pytorch_model.bin``."""
    from huggingface_hub import snapshot_download

    def get(allow: tuple[str, ...]) -> Path:
        return download(
            what,
            repo_id,
            hub_endpoint(),
            f"run `hf download {repo_id} --include {' '.join(repr(p) for p in allow)}` on a "
            "machine with internet (or copy the Hugging Face cache here)",
            lambda: Path(
                snapshot_download(
                    repo_id, allow_patterns=list(allow), cache_dir=cache_dir, revision=revision
                )
            ),
        )

    path = get(patterns)
    if "*.safetensors" in required and _missing(path, ("*.safetensors",)):
        path = get(("pytorch_model.bin",))
        required = tuple(r for r in required if r != "*.safetensors") + ("pytorch_model.bin",)
    if missing := _missing(path, required):
        raise MissingWeightsError(
            f"{what}: the {repo_id} snapshot in the Hugging Face cache ({path}) lacks "
            f"{', '.join(missing)}; run `hf download {repo_id}` on a machine with internet"
        )
    return path


def resolve_dir(
    local: str | os.PathLike | None,
    repo_id: str,
    *,
    what: str,
    model: bool,
    env: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local directory (``local``, as ``save_pretrained`` writes it) or ``repo_id``'s snapshot.

    ``model``: the directory must hold weights (``config.json`` and safetensors or
    ``pytorch_model.bin``); otherwise only the tokenizer and image-processor files."""
    required = ("config.json",) if model else ("preprocessor_config.json",)
    if local is not None:
        path = Path(local)
        weights = ("*.safetensors", "pytorch_model.bin") if model else ()
        if (
            not path.is_dir()
            or _missing(path, required)
            or (weights and len(_missing(path, weights)) == len(weights))
        ):
            where = f" (from ${env})" if env and os.environ.get(env) == str(local) else ""
            raise MissingWeightsError(
                f"{what}: {path}{where} is not a directory with "
                f"{'config.json and model weights' if model else 'preprocessor_config.json'}; "
                f"put `hf download {repo_id}` there"
            )
        return path
    patterns = MODEL_FILES if model else PROCESSOR_FILES
    needed = required + (("*.safetensors",) if model else ())
    return hub_snapshot(repo_id, what=what, patterns=patterns, required=needed, cache_dir=cache_dir)


def load_clip(model_dir: Path, device: str | torch.device) -> Any:
    """transformers' ``CLIPModel`` from ``model_dir``, float32, eval mode."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(model_dir), dtype=torch.float32).eval().to(device)


def load_image_processor(processor_dir: Path) -> Any:
    """The PIL-backend ``CLIPImageProcessor`` configured by ``processor_dir``."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(str(processor_dir))


def load_processor(processor_dir: Path) -> tuple[Any, Any]:
    """(tokenizer, PIL image processor) from ``processor_dir``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(processor_dir))
    return tokenizer, load_image_processor(processor_dir)


def embedding(out: Any) -> Tensor:
    """``get_image_features`` / ``get_text_features`` output as a tensor: transformers 5 returns
    a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the projected embedding."""
    return out if isinstance(out, Tensor) else out.pooler_output


def pixel_values(image_processor: Any, images: Tensor, device: str | torch.device) -> Tensor:
    """uint8 [n, C, H, W] -> the processor's ``pixel_values`` (PIL resize, crop, normalise)."""
    from cdmbench.metrics.clip_score import uint8_to_pil

    out = image_processor(images=uint8_to_pil(images), return_tensors="pt")["pixel_values"]
    return out.to(device=device, dtype=torch.float32)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def processor_config(image_processor: Any) -> dict[str, Any]:
    """The image processor's settings that decide the pixels, for ``config()``."""
    keys = ("size", "crop_size", "resample", "do_resize", "do_center_crop", "do_normalize")
    cfg = {k: getattr(image_processor, k, None) for k in keys}
    cfg["image_mean"] = list(image_processor.image_mean)
    cfg["image_std"] = list(image_processor.image_std)
    cfg["resample"] = str(cfg["resample"])
    return {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
