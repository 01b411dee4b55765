"""The backbone contract: one family of models behind a small interface.

Methods, samplers and metrics only talk to a model through a :class:`Backbone`, so every
method and metric works unchanged on `digits`, `sd3` and `longcat`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from cdmbench import flow


@dataclass
class Prompt:
    id: str
    text: str
    label: int | None = None  # the class on class-conditional backbones


@dataclass
class Cond:
    """Batched conditioning: a dict of batch-first tensors, plus one unconditional row."""

    tensors: dict[str, Tensor]
    null: dict[str, Tensor]  # each with a leading batch dim of 1
    # [uncond; cond], built on first use: a sampler's CFG calls reuse it at every step
    _with_uncond: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, idx: Tensor | slice) -> Cond:
        return Cond({k: v[idx] for k, v in self.tensors.items()}, self.null)

    def uncond(self, n: int | None = None) -> dict[str, Tensor]:
        n = len(self) if n is None else n
        return {k: v.expand(n, *v.shape[1:]) for k, v in self.null.items()}

    def with_uncond(self) -> dict[str, Tensor]:
        """[uncond; cond] stacked on the batch dim, for one CFG network call (built once)."""
        if self._with_uncond is None:
            u = self.uncond()
            self._with_uncond = {k: torch.cat([u[k], v]) for k, v in self.tensors.items()}
        return self._with_uncond

    def to(self, device) -> Cond:
        return Cond({k: v.to(device) for k, v in self.tensors.items()},
                    {k: v.to(device) for k, v in self.null.items()})


@dataclass
class Backbone:
    """Base class; subclasses set the class attributes and implement the abstract methods."""

    name: str = "backbone"
    latent_shape: tuple[int, ...] = ()
    shift: float = 1.0  # SD3 time shift applied to every schedule
    default_teacher_steps: int = 50
    default_teacher_cfg: float = 1.0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    fsdp_wrap_classes: tuple[type, ...] = field(default_factory=tuple)
    # convolutional parts (the VAE) in channels-last memory format; None: on CUDA only, where
    # cuDNN's NHWC kernels are the fast ones
    channels_last: bool | None = None

    def use_channels_last(self) -> bool:
        return str(self.device).startswith("cuda") if self.channels_last is None else self.channels_last

    # ---- models
    def load_teacher(self, weights: str | None = None) -> nn.Module:
        raise NotImplementedError

    def make_student(self, teacher: nn.Module) -> nn.Module:
        """A trainable copy of the teacher (students are initialised from the teacher)."""
        student = self.clone(teacher)
        student.requires_grad_(True).train()
        return student

    def clone(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model)

    # ---- conditioning
    def prompts(self, split: str = "train") -> list[Prompt]:
        raise NotImplementedError

    def encode(self, prompts: Sequence[Prompt]) -> Cond:
        raise NotImplementedError

    # ---- the network as a velocity field
    def forward(self, model: nn.Module, x: Tensor, s: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One raw network call: v(x, s | cond); ``s`` is a [B] tensor of sigmas."""
        raise NotImplementedError

    def velocity(self, model: nn.Module, x: Tensor, s: Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        """v at (x, s), with classifier-free guidance batched in one call when w != 1."""
        s = _sigma_rows(s, x)
        if guidance == 1.0:
            return self.forward(model, x, s, cond.tensors).float()
        return flow.cfg(*self.velocity_uc(model, x, s, cond), guidance)

    def velocity_uc(self, model: nn.Module, x: Tensor, s: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """(v_uncond, v_cond) from one batched call, for methods that need both."""
        s = _sigma_rows(s, x)
        v = self.forward(model, torch.cat([x, x]), torch.cat([s, s]), cond.with_uncond()).float()
        v_u, v_c = v.chunk(2)
        return v_u, v_c

    def x0(self, model: nn.Module, x: Tensor, s: Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        """The model's clean-sample prediction x0 = x - s v (float32)."""
        return flow.x0_from_v(x, s, self.velocity(model, x, s, cond, guidance))

    # ---- pixels
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images as float in [0, 1], shape [B, C, H, W]."""
        raise NotImplementedError

    def real_latents(self, split: str = "train") -> tuple[Tensor, Tensor] | None:
        """(latents, prompt index) of real data, where the backbone has it; else None."""
        return None

    def real_images(self, split: str = "test") -> Tensor | None:
        """Real images as float in [0, 1], [N, C, H, W], where the backbone has real data; else None."""
        return None

    def domain_classifier(self) -> nn.Module | None:
        """A classifier of this backbone's images (``features(x)`` and ``head(features)`` on
        inputs in [-1, 1]) whose features define domain metrics (Fréchet distance, prompt
        accuracy); None where the backbone has none."""
        return None

    def export(self, student: nn.Module, out_dir, sigmas: list[float], stochastic: bool = False) -> Path:
        """Write the student in its family's native format (diffusers layout where there is one)."""
        from cdmbench.errors import UserError

        raise UserError(f"backbone '{self.name}' has no native export format; its student is the run's "
                        "student.safetensors")

    def schedule(self, steps: int) -> list[float]:
        """The default uniform schedule at this backbone's shift."""
        return flow.uniform_schedule(steps, self.shift)

    def generation_settings(self) -> dict:
        """Settings besides the teacher's weights that change what the teacher generates from
        given noise and prompt (text encoders, sequence length, guidance variant), as plain
        JSON values: content-keyed caches of teacher samples hash them. Subclasses extend it."""
        return {"name": self.name, "latent_shape": list(self.latent_shape), "shift": self.shift}


def _sigma_rows(s: Tensor | float, x: Tensor) -> Tensor:
    """``s`` as a float32 [B] tensor on x's device (a sampler's rows pass through untouched)."""
    if isinstance(s, Tensor) and s.dtype == torch.float32 and s.shape == x.shape[:1] and s.device == x.device:
        return s
    return torch.as_tensor(s, dtype=torch.float32, device=x.device).expand(x.shape[0])
