"""CDM: Continuous-Time Distribution Matching (Liu et al., arXiv 2605.06376).

DMD moved from a few fixed timesteps to a random-length continuous schedule, plus an
off-trajectory term on latents extrapolated along the student's velocity. Per iteration:

1. Backward simulation (no grad, student at CFG 1, deterministic Euler) on a random
   schedule: N ~ U{1..n_max}, N-1 inner sigmas ~ U(0.25, 0.95) sorted, 1.0 prepended,
   shifted, 0 appended. Record xt[n], x0[n] = xt[n] - s[n] v[n], v[n]. One trajectory
   index per sample, shared by every branch below.
2. Fake score F: flow-matching MSE on x0F = x0[idx] at tau ~ U(0.02, 0.98); then merge
   the student into F: theta_F <- 0.999 theta_F + 0.001 theta_S.
3. Student, every ``update_ratio`` fake steps, three terms in x0 space, each normalised per
   sample by n = max(mean |x0_ref - sg(x0_student)|, 0.1):
   - CFG augmentation at the anchor (xt[idx], s[idx]): re-noise sg(x0s) at tau = U(0,1) s[idx];
     target = sg(x0s) + cfg_aug_scale (x0_c - x0_u) / n (teacher cond/uncond).
   - On-trajectory distribution matching at the anchor: re-noise at tau ~ U(0, 1);
     target = sg(x0s) + (x0_real - x0_fake) / n (teacher and F without CFG).
   - Off-trajectory continuous-time alignment: sigma' ~ U(0, 1); x' = xt[idx] +
     (sigma' - s[idx]) v[idx]; student x0 at (x', sigma'); re-noise at a fresh tau; same target.
   loss = sum of MSE(x0s, target); grad clip 1.0; AdamW.
4. Student EMA, decay min((1 + k)/(10 + k), 0.999) (the core's EMA).

Reference defaults (SD3-Medium): AdamW betas (0.9, 0.999), weight decay 1e-4, student lr
1e-5, fake lr 5e-6, warm-up 100, batch 16 x 8 GPUs, n_max 28, update ratio 2, CFG-aug
scale 7.0, merge 0.001, sigmas clamped to [0.02, 0.98]. Evaluation: 4 steps on
[1, .75, .5, .25] pre-shift, CFG 1, EMA weights.

Quirks of the reference implementation and what this module does:
- Its "uniform" sampler ignores the upper bound passed to it, so the DM branch's tau and
  the off-trajectory sigma' are drawn from the full range rather than below s[idx]. The
  paper's text matches the full-range behaviour, which is the default here; set
  ``cap_dm_tau`` / ``cap_offtraj_sigma`` to draw them in (0, s[idx]) instead.
- It seeds the schedule length with a tuple, which fails on Python >= 3.11; here the
  length comes from a generator seeded identically on every process (the core's
  ``g_shared``), which is what the tuple seed was meant to achieve.
- The anchor's CFG-augmentation and on-trajectory terms each run their own student forward
  on the same input; the forwards are identical (no dropout), so this module runs one and
  uses it for both: the gradient is the same, one network call cheaper.

Ablations: ``schedule="fixed"`` (backward simulation on the 4-step evaluation list instead
of the random one), ``offtraj=False`` (a Decoupled-DMD-like method), ``ontraj=False`` and
``cfg_aug_scale=0`` (off-trajectory term only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cdmbench import flow
from cdmbench.training.core import OptimSpec, dm_normalizer, fm_loss, merge_
from cdmbench.training.method import Method, SamplerSpec


@dataclass
class CDMConfig:
    student_lr: float = 1e-5
    fake_lr: float = 5e-6
    weight_decay: float = 1e-4
    warmup: int = 100
    update_ratio: int = 2  # fake steps per student step
    n_max: int = 28  # random schedule length N ~ U{1..n_max}
    inner_lo: float = 0.25  # inner sigmas ~ U(inner_lo, inner_hi), pre-shift
    inner_hi: float = 0.95
    schedule: str = "random"  # "random" (the paper) or "fixed" (ablation: eval list)
    cfg_aug_scale: float = 7.0  # guidance of the CFG-augmentation term; 0 disables it
    ontraj: bool = True  # on-trajectory distribution matching
    offtraj: bool = True  # off-trajectory continuous-time alignment (the paper's new term)
    norm_floor: float = 0.1  # n = max(mean |x0_ref - x0|, norm_floor)
    merge: float = 0.001  # theta_F <- (1 - merge) theta_F + merge theta_S after each fake step
    cap_dm_tau: bool = False  # reference quirk: DM tau is full range (see module docstring)
    cap_offtraj_sigma: bool = False  # same quirk for sigma'
    eval_sigmas: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # pre-shift 4-step list


class CDM(Method):
    """Continuous-Time Distribution Matching (arXiv 2605.06376)."""

    name = "cdm"
    Config = CDMConfig
    optim_groups_names = ("fake", "student")
    backbone_defaults = {
        # digits: schedules of 1-8 steps suffice; the teacher's few-step FD is best at CFG 1, so
        # the CFG-augmentation term (which pushes toward guidance 1 + scale) is off, and the fake
        # score gets 5 updates per student update (DESIGN section 10 calibration).
        "digits": {"student_lr": 2e-5, "fake_lr": 1e-4, "n_max": 8, "update_ratio": 5,
                   "cfg_aug_scale": 0.0, "warmup": 50,
                   "train": {"iters": 1500, "batch": 128}},
    }

    def build(self, core) -> dict:
        fake = core.backbone.clone(core.student).requires_grad_(True).train()
        return {"fake": fake}

    def optim_groups(self, core) -> dict[str, OptimSpec]:
        c = self.cfg
        return {
            "fake": OptimSpec("fake", lr=c.fake_lr, weight_decay=c.weight_decay, warmup=c.warmup),
            "student": OptimSpec("student", lr=c.student_lr, weight_decay=c.weight_decay, warmup=c.warmup),
        }

    def groups_to_update(self, it: int) -> list[str]:
        return ["fake", "student"] if it % self.cfg.update_ratio == 0 else ["fake"]

    def sampler(self, steps: int, shift: float) -> SamplerSpec:
        if steps == len(self.cfg.eval_sigmas):
            return SamplerSpec(flow.explicit_schedule(self.cfg.eval_sigmas, shift))
        return SamplerSpec(flow.uniform_schedule(steps, shift))

    # ------------------------------------------------------------------------------
    def _schedule(self, core) -> list[float]:
        c = self.cfg
        if c.schedule == "fixed":
            return flow.explicit_schedule(c.eval_sigmas, core.backbone.shift)
        return flow.random_schedule(core.g_shared, 1, c.n_max, c.inner_lo, c.inner_hi, core.backbone.shift)

    @torch.no_grad()
    def _simulate(self, batch, core) -> dict[str, Tensor]:
        """Step 1: backward simulation on a schedule, one anchor per sample."""
        bb = core.backbone
        sigmas = self._schedule(core)
        velocity = lambda x, s: bb.velocity(core.student, x, s, batch.cond)  # noqa: E731
        _, traj = flow.sample(velocity, batch.noise, sigmas, record=True)
        b = len(batch)
        idx = core.randint(len(traj.xt), b)
        rows = torch.arange(b, device=idx.device)
        xt = torch.stack(traj.xt)[idx, rows]
        v = torch.stack(traj.v)[idx, rows]
        x0 = torch.stack(traj.x0)[idx, rows]
        s = torch.tensor(sigmas[:-1], dtype=torch.float32, device=xt.device)[idx]
        return {"xt": xt, "v": v, "x0": x0, "s": s, "n_steps": len(sigmas) - 1}

    def _dm_target(self, x0s: Tensor, tau: Tensor, batch, core) -> Tensor:
        """sg(x0s) + (x0_real - x0_fake) / n at a re-noised point (teacher and F at CFG 1)."""
        bb = core.backbone
        with torch.no_grad():
            x0s = x0s.detach()
            x_tau = flow.add_noise(x0s, core.randn(*x0s.shape), tau)
            x0_real = bb.x0(core.teacher, x_tau, tau, batch.cond)
            x0_fake = bb.x0(core.models["fake"], x_tau, tau, batch.cond)
            n = dm_normalizer(x0_real, x0s, self.cfg.norm_floor)
            return x0s + (x0_real - x0_fake) / n

    def losses(self, group: str, it: int, batch, core) -> dict[str, Tensor]:
        c, bb = self.cfg, core.backbone
        if "sim" not in batch.cache:
            batch.cache["sim"] = self._simulate(batch, core)
        sim = batch.cache["sim"]
        b = len(batch)

        if group == "fake":
            tau = flow.clamp_sigma(core.rand(b))
            return {"fm": fm_loss(bb, core.models["fake"], sim["x0"], batch.cond, tau, core.randn(*sim["x0"].shape))}

        terms: dict[str, Tensor] = {}
        s_anchor = sim["s"]
        if c.cfg_aug_scale > 0 or c.ontraj:
            x0s = bb.x0(core.student, sim["xt"], s_anchor, batch.cond)
            if c.cfg_aug_scale > 0:
                tau = flow.clamp_sigma(core.rand(b) * s_anchor)
                with torch.no_grad():
                    sg = x0s.detach()
                    x_tau = flow.add_noise(sg, core.randn(*sg.shape), tau)
                    v_u, v_c = bb.velocity_uc(core.teacher, x_tau, tau, batch.cond)
                    x0_u, x0_c = flow.x0_from_v(x_tau, tau, v_u), flow.x0_from_v(x_tau, tau, v_c)
                    target = sg + c.cfg_aug_scale * (x0_c - x0_u) / dm_normalizer(x0_c, sg, c.norm_floor)
                terms["cfg_aug"] = F.mse_loss(x0s, target)
            if c.ontraj:
                tau = core.rand(b) * (s_anchor if c.cap_dm_tau else 1.0)
                terms["dm_on"] = F.mse_loss(x0s, self._dm_target(x0s, flow.clamp_sigma(tau), batch, core))
        if c.offtraj:
            sp = flow.clamp_sigma(core.rand(b) * (s_anchor if c.cap_offtraj_sigma else 1.0))
            x_off = sim["xt"] + (sp - s_anchor).view(-1, *[1] * (sim["xt"].ndim - 1)) * sim["v"]
            x0_off = bb.x0(core.student, x_off, sp, batch.cond)
            tau = flow.clamp_sigma(core.rand(b))
            terms["dm_off"] = F.mse_loss(x0_off, self._dm_target(x0_off, tau, batch, core))
        return terms

    def after_step(self, group: str, it: int, core) -> None:
        if group == "fake" and self.cfg.merge > 0:
            merge_(core.models["fake"], core.student, self.cfg.merge)
