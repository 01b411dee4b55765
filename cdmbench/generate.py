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


def save_grid(images: Tensor, path, nrow: int, scale: int = 1) -> None:
    """Write [B, C, H, W] images in [0, 1] as one PNG grid (nearest-neighbour upscaled)."""
    import numpy as np
    from PIL import Image

    from cdmbench.io import atomic_path

    x = images.detach().float().clamp(0, 1).cpu()
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
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
