"""Test oracles: the reward and diversity scores as the CDM authors compute them.

Each function below is an independent re-statement of one upstream computation, taking the
already-built networks as arguments (the tests build tiny or random ones, on the CPU). It
reproduces the authors' preprocessing, conventions and, where it shows at the tests' 1e-5
relative tolerance, their order of arithmetic. The docstrings name the upstream functions:

- byliutao/cdm at commit bacc57f (MIT licence), ``cdm/rewards/*_scorer.py``;
- christophschuhmann/improved-aesthetic-predictor at commit fe88a16 (Apache-2.0),
  ``simple_inference.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn

TEXT_ARGS = {"padding": True, "truncation": True, "max_length": 77}


def _embedding(out) -> torch.Tensor:
    """``get_*_features`` gives a tensor in transformers 4.x, a pooled model output in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


# ---------------------------------------------------------------- PickScore


@torch.no_grad()
def pickscore_reference(model, processor, prompts, images) -> torch.Tensor:
    """PickScore of image k for prompt k, as byliutao/cdm@bacc57f computes it in
    ``cdm/rewards/pickscore_scorer.py``, ``PickScoreScorer.__call__``.

    Images and prompts each go through the CLIP processor on their own, both calls with padding,
    truncation and ``max_length=77``. The image and text embeddings are divided by their L2 norms;
    the score matrix is ``exp(logit_scale) * (text @ image.T)``, and image k's score is its
    diagonal entry k (no further rescaling).
    """
    pixels = processor(images=images, return_tensors="pt", **TEXT_ARGS)
    tokens = processor(text=prompts, return_tensors="pt", **TEXT_ARGS)
    img = _unit(_embedding(model.get_image_features(**pixels)))
    txt = _unit(_embedding(model.get_text_features(**tokens)))
    return (model.logit_scale.exp() * (txt @ img.T)).diagonal()


# ---------------------------------------------------------------- CLIP score (cosine / 100 scale)


def _torchvision_size(size):
    """A transformers size entry as torchvision wants it: an int or ``{"shortest_edge": s}``
    resizes the short side (an int means a square), ``{"height", "width"}`` an exact shape."""
    if isinstance(size, int):
        return size, size
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    if "shortest_edge" in size:
        return size["shortest_edge"]
    raise ValueError(f"unsupported image-processor size {size!r}")


def _tensor_preprocess(image_processor) -> T.Compose:
    """The CLIP image processor's resize, center crop and normalisation, as torchvision tensor
    transforms (on float images in [0, 1], torchvision's default interpolation and antialias)."""
    cfg = image_processor.to_dict()
    steps = []
    if cfg.get("do_resize"):
        steps.append(T.Resize(_torchvision_size(cfg["size"])))
    if cfg.get("do_center_crop"):
        steps.append(T.CenterCrop(_torchvision_size(cfg["crop_size"])))
    if cfg.get("do_normalize"):
        steps.append(T.Normalize(image_processor.image_mean, image_processor.image_std))
    return T.Compose(steps)


@torch.no_grad()
def clip_cos_reference(model, processor, pixels, prompts) -> torch.Tensor:
    """Cosine CLIP score of image k for prompt k on the 0-1 scale (logit / 100), as
    byliutao/cdm@bacc57f computes it in ``cdm/rewards/clip_scorer.py``, ``ClipScorer.__call__``
    (with ``get_image_transform`` building the transform from the processor's configuration).

    ``pixels``: float images in [0, 1], N x 3 x H x W. They are resized, center-cropped and
    normalised with torchvision on the tensor (not the processor's PIL path), kept in their
    dtype; the prompts are tokenised padded to ``max_length``. One forward of the full CLIP
    model; the diagonal of ``logits_per_image`` divided by 100.
    """
    tokens = processor(text=prompts, padding="max_length", truncation=True, return_tensors="pt")
    x = _tensor_preprocess(processor.image_processor)(pixels).to(pixels.dtype)
    logits = model(pixel_values=x, **tokens).logits_per_image
    return logits.diagonal() / 100


# ---------------------------------------------------------------- LAION aesthetic predictor


def aesthetic_head(input_size: int = 768) -> nn.Module:
    """The aesthetic predictor's untrained head, parameter for parameter the network of
    improved-aesthetic-predictor ``simple_inference.py`` ``MLP`` (and of byliutao/cdm@bacc57f
    ``cdm/rewards/aesthetic_scorer.py`` ``MLP``), so that the released ``.pth`` state dicts load:
    under ``layers``, linear maps input_size -> 1024 -> 128 -> 64 -> 16 -> 1 at indices 0, 2, 4,
    6, 7, with dropout (0.2, 0.2, 0.1; identity in eval mode) at 1, 3, 5 and no nonlinearity.
    """
    widths = [input_size, 1024, 128, 64, 16, 1]
    dropout_after = {0: 0.2, 1: 0.2, 2: 0.1}
    stack: list[nn.Module] = []
    for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        stack.append(nn.Linear(n_in, n_out))
        if k in dropout_after:
            stack.append(nn.Dropout(dropout_after[k]))
    return nn.Sequential(OrderedDict(layers=nn.Sequential(*stack)))


@torch.no_grad()
def aesthetic_reference(clip, processor, head, images, dtype=torch.float32) -> torch.Tensor:
    """Aesthetic score per image, as byliutao/cdm@bacc57f computes it in
    ``cdm/rewards/aesthetic_scorer.py``, ``AestheticScorer.__call__``.

    ``images`` go to the CLIP processor as given (the authors pass the uint8 N x 3 x H x W
    tensor); the pixel values are cast to ``dtype``; the CLIP image embedding is divided by its
    L2 norm (``torch.linalg.vector_norm``) and the head's N x 1 output is flattened to N.
    """
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(dtype)
    emb = _embedding(clip.get_image_features(pixel_values=pixels))
    emb = emb / torch.linalg.vector_norm(emb, dim=-1, keepdim=True)
    return head(emb)[:, 0]


@torch.no_grad()
def aesthetic_predictor_reference(clip, processor, head, pil_image) -> float:
    """Aesthetic score of one PIL image, following improved-aesthetic-predictor@fe88a16
    ``simple_inference.py`` (its script body and ``normalized``), with the transformers CLIP
    model and processor standing in for OpenAI's ``clip`` package.

    One image per forward; the embedding leaves torch for NumPy, is divided by its L2 norm there
    (a zero norm counts as 1), comes back as float32 and goes through the head.
    """
    pixels = processor(images=pil_image, return_tensors="pt")["pixel_values"]
    emb = _embedding(clip.get_image_features(pixel_values=pixels)).cpu().numpy()
    norm = np.linalg.norm(emb, ord=2, axis=-1, keepdims=True)
    norm[norm == 0] = 1
    return head(torch.from_numpy(emb / norm).float()).item()


# ---------------------------------------------------------------- diversity (LPIPS-AlexNet)


@torch.inference_mode()
def intra_lpips_reference(lpips_model, groups, pairs_per_batch: int = 64) -> float:
    """Mean over prompts of the mean LPIPS distance over each prompt's image pairs, as
    byliutao/cdm@bacc57f computes it in ``cdm/rewards/diversity_scorer.py``,
    ``DiversityScorer.compute_intra_lpips``.

    ``groups``: prompt -> float images in [0, 1], K x 3 x H x W. Prompts with fewer than two
    images are skipped (0.0 when none is left). The pairs (i, j), i < j, in lexicographic order,
    are scored ``pairs_per_batch`` at a time on images mapped to [-1, 1]; the per-pair distances
    become Python floats, and both means are NumPy means.
    """
    prompt_means = []
    for imgs in groups.values():
        if len(imgs) < 2:
            continue
        pairs = list(combinations(range(len(imgs)), 2))
        dists: list[float] = []
        for start in range(0, len(pairs), pairs_per_batch):
            first, second = zip(*pairs[start : start + pairs_per_batch], strict=True)
            a, b = imgs[list(first)], imgs[list(second)]
            dists += lpips_model(2 * a - 1, 2 * b - 1).flatten().tolist()
        prompt_means.append(float(np.mean(dists)))
    return float(np.mean(prompt_means)) if prompt_means else 0.0


@torch.inference_mode()
def _alexnet_descriptors(lpips_model, imgs, per_batch: int) -> torch.Tensor:
    """Unit-norm image descriptors: the LPIPS trunk's deepest feature map on images in [-1, 1],
    averaged over its spatial positions, in float32."""
    chunks = [
        lpips_model.net(2 * imgs[s : s + per_batch] - 1)[-1].mean(dim=(-2, -1))
        for s in range(0, len(imgs), per_batch)
    ]
    return F.normalize(torch.cat(chunks).float(), p=2, dim=1)


def vendi_reference(lpips_model, groups, images_per_batch: int = 64) -> float:
    """Mean over prompts of the Vendi score of each prompt's images, as byliutao/cdm@bacc57f
    computes it in ``cdm/rewards/diversity_scorer.py``, ``DiversityScorer.compute_vendi_score``
    (features from ``DiversityScorer._extract_features``).

    ``groups`` as for :func:`intra_lpips_reference`; prompts with fewer than two images are
    skipped (0.0 when none is left). The kernel is the cosine similarity of the descriptors,
    clipped to [0, 1] in NumPy; the score is the authors' installed ``vendi_score.vendi.score_K``.
    """
    from vendi_score import vendi

    scores = []
    for imgs in groups.values():
        if len(imgs) < 2:
            continue
        d = _alexnet_descriptors(lpips_model, imgs, images_per_batch)
        kernel = np.clip((d @ d.T).numpy(), 0.0, 1.0)
        scores.append(float(vendi.score_K(kernel)))
    return float(np.mean(scores)) if scores else 0.0
