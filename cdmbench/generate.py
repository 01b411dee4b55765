"""Generation with per-sample seeds: results do not depend on batch size or process count."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cdmbench import flow
from cdmbench.backbones.base import Backbone
from cdmbench.prompts_io import Prompt


@dataclass
class SamplerSpec:
    """How a model generates at a step count: the post-shift sigmas and the update rule."""

    sigmas: list[float]
    stochastic: bool = False  # re-noise with fresh noise between steps (DMD2-style)
    guidance: float = 1.0  # students have guidance distilled in


def seeds_for(
    run_seed: int, prompts: Sequence[Prompt], per_prompt: int
) -> list[tuple[Prompt, int, int]]:
    """(prompt, sample index, seed) for every sample, in a fixed order."""
    return [(p, i, flow.sample_seed(run_seed, p.id, i)) for p in prompts for i in range(per_prompt)]


@torch.inference_mode()
def generate(
    backbone: Backbone,
    model: nn.Module,
    prompts: Sequence[Prompt],
    seeds: Sequence[int],
    spec: SamplerSpec,
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """Latents for ``prompts[i]`` from seed ``seeds[i]`` under ``spec``.

    Initial noise and every re-noising draw come from the sample's own seed (re-noise j uses
    seed ``sample_seed(seed, "renoise", j)``), so a sample is the same in any batch.
    """
    out = []
    for i in range(0, len(prompts), batch_size):
        ps, ss = prompts[i : i + batch_size], list(seeds[i : i + batch_size])
        cond = backbone.encode(ps)
        noise = flow.seeded_noise(backbone.latent_shape, ss, device=backbone.device)
        renoise = None
        if spec.stochastic:

            def renoise(j: int, ss=ss) -> Tensor:
                return flow.seeded_noise(
                    backbone.latent_shape,
                    [flow.sample_seed(s, "renoise", j) for s in ss],
                    device=backbone.device,
                )

        velocity = lambda x, s, c=cond: backbone.velocity(model, x, s, c, spec.guidance)  # noqa: E731
        out.append(
            flow.sample(velocity, noise, spec.sigmas, stochastic=spec.stochastic, renoise=renoise)
        )
        if on_batch is not None:
            on_batch(len(ps))
    return torch.cat(out)


MAX_CELL = 256  # pixels on a grid cell's longer side
MAX_GRID_PIXELS = 4_000_000  # pixels of a whole grid


def grid_cell_scale(
    h: int,
    w: int,
    cells: int,
    scale: int = 1,
    max_cell: int = MAX_CELL,
    max_pixels: int = MAX_GRID_PIXELS,
) -> float:
    """The factor a grid applies to [h, w] images: ``scale`` (a whole number, nearest-neighbour
    up) while a cell fits in ``max_cell`` pixels and the ``cells`` fit in ``max_pixels``, else
    the largest whole factor that fits, else a downscale below 1."""
    limit = min(max_cell, int((max_pixels / max(cells, 1)) ** 0.5))
    side = max(h, w)
    if side * scale <= limit:
        return float(scale)
    if side <= limit:
        return float(limit // side)
    return limit / side


def save_grid(
    images: Tensor,
    path,
    nrow: int,
    scale: int = 1,
    max_cell: int = MAX_CELL,
    max_pixels: int = MAX_GRID_PIXELS,
) -> None:
    """Write [B, C, H, W] images in [0, 1] as one PNG grid of ``nrow`` columns, each cell
    nearest-neighbour upscaled ``scale`` times; bounded: a cell is at most ``max_cell``
    pixels a side and the grid about ``max_pixels`` (larger images are downscaled with
    antialiasing), so a grid of 1024 px samples stays a few megapixels."""
    from cdmbench.io import atomic_path

    img = grid_image(images, nrow, scale, max_cell, max_pixels)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def grid_image(
    images: Tensor,
    nrow: int,
    scale: int = 1,
    max_cell: int = MAX_CELL,
    max_pixels: int = MAX_GRID_PIXELS,
):
    """The PIL image :func:`save_grid` writes."""
    import numpy as np
    from PIL import Image

    x = images.detach().float().clamp(0, 1).cpu()
    factor = grid_cell_scale(x.shape[-2], x.shape[-1], x.shape[0], scale, max_cell, max_pixels)
    if factor < 1:
        size = (max(1, int(x.shape[-2] * factor)), max(1, int(x.shape[-1] * factor)))
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)
        x = x.clamp(0, 1)
    scale = int(factor) if factor >= 1 else 1
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    b, c, h, w = x.shape
    ncol = nrow
    nrows = (b + ncol - 1) // ncol
    pad = max(1, scale)
    canvas = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for k in range(b):
        r, q = divmod(k, ncol)
        canvas[
            :,
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + q * (w + pad) : pad + q * (w + pad) + w,
        ] = x[k]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
