"""A tiny 2-D class-conditional backbone for method and training-core tests.

Data: a Gaussian mixture in the plane, two classes with two modes each (std 0.15):
class 0 at (-2, 0) and (0, 2), class 1 at (2, 0) and (0, -2); label 2 is the null class.
Teacher: a small MLP velocity net trained by flow matching on that mixture (seeded, a few
hundred AdamW steps, cached per process); every ``load_teacher`` returns a frozen deep copy.

The teacher's 1-step sample is (close to) the class mean, at distance sqrt(2) from every
mode of its class; its many-step samples sit on the modes. That gap is what a few-step
student has to close.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdmbench import flow
from cdmbench.backbones.base import Backbone, BackboneSettings, Cond
from cdmbench.prompts_io import Prompt
from cdmbench.settings import setting

NUM_CLASSES = 2
NULL_CLASS = 2
MODES = torch.tensor([[[-2.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [0.0, -2.0]]])  # [class, mode, xy]
STD = 0.15


def sample_mixture(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(points [n, 2], labels [n]): balanced classes, each mode of a class equally likely."""
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    which = torch.randint(0, 2, (n,), generator=generator)
    x = MODES[labels, which] + STD * torch.randn(n, 2, generator=generator)
    return x, labels


def mode_distance(x: Tensor, labels: Tensor) -> Tensor:
    """Mean distance from each point to the nearest mode of its own class."""
    d = (x[:, None, :] - MODES[labels]).norm(dim=-1)  # [n, 2]
    return d.min(dim=1).values.mean()


class ToyNet(nn.Module):
    """v(x, t = 1000 s, y): sinusoidal time features, label embedding, two hidden layers."""

    def __init__(self, width: int = 64, freqs: int = 4) -> None:
        super().__init__()
        self.freqs = freqs
        self.inp = nn.Linear(2 + 2 * freqs, width)
        self.y_emb = nn.Embedding(NUM_CLASSES + 1, width)
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        s = (t.float() / 1000.0)[:, None]
        k = math.pi * 2.0 ** torch.arange(self.freqs, dtype=torch.float32, device=x.device)
        feats = torch.cat([x, torch.sin(s * k), torch.cos(s * k)], dim=-1)
        h = F.silu(self.inp(feats) + self.y_emb(y))
        h = F.silu(self.fc(h))
        return self.out(h)


@lru_cache(maxsize=1)
def _trained_teacher(iters: int = 800, batch: int = 256, seed: int = 0) -> ToyNet:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ToyNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    for _ in range(iters):
        x0, y = sample_mixture(batch, g)
        y = torch.where(torch.rand(batch, generator=g) < 0.1, NULL_CLASS, y)
        eps = torch.randn(x0.shape, generator=g)
        s = torch.rand(batch, generator=g)
        xt = flow.add_noise(x0, eps, s)
        loss = F.mse_loss(net(xt, flow.timestep(s), y), flow.velocity_target(x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


@dataclass(frozen=True)
class ToySettings(BackboneSettings):
    teacher_steps: int = 32
    teacher_guidance: float = 1.0
    eval_metrics: tuple[str, ...] = setting(("latency",), hashed=False)


class Toy(Backbone):
    """The 2-D mixture backbone (latent_shape (2,), shift 1, null class 2)."""

    name = "toy"
    Settings = ToySettings
    latent_shape = (2,)
    shift = 1.0

    def __init__(self, device: str = "cpu", name: str = "toy", settings=None, **kwargs) -> None:
        super().__init__(device, settings, **kwargs)
        self.name = name

    def load_teacher(self, weights: str | None = None) -> nn.Module:
        net = copy.deepcopy(_trained_teacher())
        return net.to(self.device).eval().requires_grad_(False)

    def prompts(self, split: str = "train") -> list[Prompt]:
        return [
            Prompt(id="toy-0", text="class zero", label=0),
            Prompt(id="toy-1", text="class one", label=1),
        ]

    def encode(self, prompts: Sequence[Prompt]) -> Cond:
        labels = [NULL_CLASS if p.label is None else p.label for p in prompts]
        return self.encode_labels(torch.tensor(labels, dtype=torch.long))

    def encode_labels(self, labels: Tensor) -> Cond:
        return Cond(
            {"label": labels.to(self.device)},
            {"label": torch.tensor([NULL_CLASS], device=self.device)},
        )

    def forward(self, model: nn.Module, x: Tensor, s: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return model(x, flow.timestep(s), cond["label"])

    def decode(self, latents: Tensor) -> Tensor:
        """Each point as an 8x8 grey image of [-3, 3]^2: a Gaussian splat where it lies."""
        grid = torch.linspace(-3.0, 3.0, 8, device=latents.device)
        gy, gx = torch.meshgrid(-grid, grid, indexing="ij")  # row 0 at the top: y = +3
        p = latents.float()[:, :, None, None]
        d2 = (gx - p[:, 0]) ** 2 + (gy - p[:, 1]) ** 2  # [B, 8, 8]
        return torch.exp(-d2 / (2 * 0.5**2))[:, None]

    def real_latents(self, split: str = "train") -> tuple[Tensor, Tensor]:
        return sample_mixture(4096, torch.Generator().manual_seed(1 if split == "train" else 2))
