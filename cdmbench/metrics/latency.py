"""Latency: wall time per image of one generation call, end to end and denoiser only.

The timer runs the evaluated sampler itself (encode prompts, seeded noise, sampling, decode),
synchronising CUDA around each phase, so it measures what a user of the student would wait.
Its values measure the machine as much as the model: ``cdmbench check`` skips them unless a
tolerance is given.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cdmbench import flow
from cdmbench.backbones.base import Backbone
from cdmbench.metrics.base import EvalSet, Metric, Value
from cdmbench.prompts_io import Prompt

if TYPE_CHECKING:
    from cdmbench.generate import SamplerSpec


def make_timer(
    backbone: Backbone, model: nn.Module, spec: SamplerSpec, prompts: Sequence[Prompt]
) -> Callable[[int], tuple[float, float]]:
    """timer(batch) -> (end-to-end seconds, denoiser-only seconds) of one generation call."""
    cuda = str(backbone.device).startswith("cuda")

    def now_sync() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @torch.inference_mode()
    def timer(batch: int) -> tuple[float, float]:
        ps = [prompts[i % len(prompts)] for i in range(batch)]
        t0 = now_sync()
        cond = backbone.encode(ps)
        noise = flow.seeded_noise(backbone.latent_shape, list(range(batch)), device=backbone.device)
        t1 = now_sync()
        lat = flow.sample(
            lambda x, s: backbone.velocity(model, x, s, cond, spec.guidance),
            noise,
            spec.sigmas,
            stochastic=spec.stochastic,
        )
        t2 = now_sync()
        backbone.decode(lat)
        t3 = now_sync()
        return t3 - t0, t2 - t1

    return timer


def _timing(description: str) -> Value:
    return Value(
        higher_is_better=False, tolerance=None, machine_dependent=True, description=description
    )


class Latency(Metric):
    """Wall time per image: warm-up, then repeats; median and p90, end to end and denoiser only."""

    name = "latency"
    values = {
        "latency_ms": _timing("median end-to-end ms per image, batch 1"),
        "latency_p90_ms": _timing("90th percentile end-to-end ms per image, batch 1"),
        "denoiser_ms": _timing("median denoiser-only ms per image, batch 1"),
        "latency_batch_ms": _timing("median end-to-end ms per image at the eval batch"),
        "compile_s": _timing("torch.compile time of the denoiser, s (with --compile)"),
    }
    needs = ("timer",)

    def __init__(self, warmup: int = 3, repeats: int = 20) -> None:
        self.warmup, self.repeats = warmup, repeats

    def config(self) -> dict[str, Any]:
        return {
            "warmup": self.warmup,
            "repeats": self.repeats,
            "clock": "perf_counter, CUDA-synchronised on GPU",
            "unit": "ms per image",
            "batch_sizes": "1 and the eval batch",
        }

    def compute(self, data: EvalSet) -> dict[str, float]:
        assert data.timer is not None
        compile_s = data.extra.get("compile_s")
        for _ in range(self.warmup):
            data.timer(1)
        runs = [data.timer(1) for _ in range(self.repeats)]
        e2e = sorted(r[0] for r in runs)
        den = sorted(r[1] for r in runs)
        b = max(1, data.eval_batch)
        data.timer(b)
        per_img_batch = (
            statistics.median(data.timer(b)[0] for _ in range(max(3, self.repeats // 4))) / b
        )
        out = {
            "latency_ms": 1e3 * statistics.median(e2e),
            "latency_p90_ms": 1e3 * float(np.percentile(e2e, 90)),
            "denoiser_ms": 1e3 * statistics.median(den),
            "latency_batch_ms": 1e3 * per_img_batch,
        }
        if compile_s is not None:  # paid once per architecture and shape, reported on its own
            out["compile_s"] = compile_s
        return out


__all__ = ["Latency", "make_timer"]
