"""DMD2: Improved Distribution Matching Distillation (Yin et al., arXiv 2405.14867).

Changes from DMD: no regression loss; two time-scale update rule (the fake score is updated
every iteration, the generator every ``update_ratio``-th, Sec. 4.1); multi-step generators
trained by backward simulation on a fixed discrete list (Sec. 4.4): pick a step k of the
list, run the student from pure noise for k steps with no grad (predict x0, re-noise with
fresh noise at the next sigma), then predict x0 at step k with grad and apply DMD's
distribution-matching loss there; the fake score trains on the same sample. The simulation
is the iteration's state (:meth:`DMD2.prepare`), shared by both groups. Inference runs the
same stochastic loop. The GAN head (Sec. 4.3) is off by default and not built here: it needs
real images, and the benchmark compares the distillation objectives themselves.

Defaults (SDXL setting of the paper): generator and fake lr 5e-7, AdamW betas (0.9, 0.999),
weight decay 1e-2, real guidance 8.0, update ratio 5, 4-step list [999, 749, 499, 249] /
1000 = [1.0, .75, .5, .25] pre-shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cdmbench import flow
from cdmbench.losses import dm_loss, fm_loss
from cdmbench.settings import MAX_COUNT, setting
from cdmbench.training.method import Batch, Core, Method, OptimSpec, SamplerSpec


@dataclass
class DMD2Config:
    student_lr: float = setting(5e-7, gt=0)
    fake_lr: float = setting(5e-7, ge=0)
    weight_decay: float = setting(1e-2, ge=0)
    warmup: int = setting(0, ge=0, le=MAX_COUNT)
    real_guidance: float = setting(8.0, ge=0)
    update_ratio: int = setting(5, ge=1, le=1000)  # fake updates per generator update (TTUR)
    # backward-simulation list, pre-shift
    train_sigmas: tuple[float, ...] = setting((1.0, 0.75, 0.5, 0.25), gt=0, le=1)
    norm_floor: float = setting(1e-6, gt=0)


@dataclass
class Simulation:
    """One iteration's backward simulation: the student's sample x at sigma s, and its x0
    prediction there once a group has made it."""

    x: Tensor
    s: Tensor  # [B], every entry the sigma of the chosen step
    x0: Tensor | None = None  # sg(x0_S(x, s))


class DMD2(Method[Simulation]):
    """DMD2: two time-scale updates, multi-step backward simulation (arXiv 2405.14867)."""

    name = "dmd2"
    Config = DMD2Config
    aux_models = {"fake": True}
    grad_forwards = {"student": 1, "fake": 1}
    backbone_defaults = {
        # digits: the teacher's few-step FD is best at CFG 1, so the real score runs at w = 1
        # (measured: w = 2 gave FD 56.9 / 18.1 at 1 / 2 steps, w = 1 gave 15.2 / 8.0).
        "digits": {
            "student_lr": 1e-4,
            "fake_lr": 1e-4,
            "real_guidance": 1.0,
            "weight_decay": 1e-4,
            "warmup": 50,
            "train": {"iters": 1500, "batch": 128},
        },
    }
    # `cdmbench sweep`: paper (SDXL) values 5e-7 / 5e-7 / 8.0 / 5, tuned digits 1e-4 / 1e-4 / 1.0 / 5
    search_space = {
        "student_lr": ("log", 3e-7, 3e-4),
        "fake_lr": ("log", 3e-7, 3e-4),
        "real_guidance": ("uniform", 1.0, 8.0),
        "update_ratio": ("int", 1, 10),
    }

    def build(self, core: Core) -> dict[str, nn.Module]:
        return {"fake": core.backbone.clone(core.student).requires_grad_(True).train()}

    def optim_groups(self, core: Core) -> dict[str, OptimSpec]:
        c = self.config
        return {
            "fake": OptimSpec("fake", lr=c.fake_lr, weight_decay=c.weight_decay, warmup=c.warmup),
            "student": OptimSpec(
                "student", lr=c.student_lr, weight_decay=c.weight_decay, warmup=c.warmup
            ),
        }

    def groups_to_update(self, it: int) -> list[str]:
        return ["fake", "student"] if it % self.config.update_ratio == 0 else ["fake"]

    def sampler(self, steps: int, shift: float) -> SamplerSpec:
        sigmas = self.config.train_sigmas
        if steps == len(sigmas):
            return SamplerSpec(flow.explicit_schedule(sigmas, shift), stochastic=True)
        return SamplerSpec(flow.uniform_schedule(steps, shift), stochastic=True)

    @torch.no_grad()
    def prepare(self, it: int, batch: Batch, core: Core) -> Simulation:
        """Backward simulation: k ~ U{0..K-1} shared by all processes, then k student steps
        from the batch noise, each predicting x0 and re-noising to the next sigma."""
        bb = core.backbone
        sigmas = flow.explicit_schedule(self.config.train_sigmas, bb.shift)[:-1]
        k = int(torch.randint(0, len(sigmas), (1,), generator=core.g_shared).item())
        x = batch.noise
        for j in range(k):
            s = torch.full((len(x),), sigmas[j], device=x.device)
            x = flow.renoise_step(
                bb.x0(core.student, x, s, batch.cond), sigmas[j + 1], core.randn(*x.shape)
            )
        return Simulation(x, torch.full((len(x),), sigmas[k], device=x.device))

    def losses(
        self, group: str, it: int, batch: Batch, state: Simulation, core: Core
    ) -> dict[str, Tensor]:
        c, bb = self.config, core.backbone
        if group == "student":
            x0 = bb.x0(core.student, state.x, state.s, batch.cond)
            state.x0 = x0.detach()
            tau = flow.clamp_sigma(core.rand(len(batch)))
            return {
                "dm": dm_loss(
                    bb,
                    core.teacher,
                    core.models["fake"],
                    x0,
                    batch.cond,
                    tau,
                    core.randn(*x0.shape),
                    c.real_guidance,
                    c.norm_floor,
                )
            }
        if state.x0 is None:  # fake-only iteration: generate without grad
            with torch.no_grad():
                state.x0 = bb.x0(core.student, state.x, state.s, batch.cond)
        tau = flow.clamp_sigma(core.rand(len(batch)))
        return {
            "fm": fm_loss(
                bb, core.models["fake"], state.x0, batch.cond, tau, core.randn(*state.x0.shape)
            )
        }
