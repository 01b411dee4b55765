"""DMD2: Improved Distribution Matching Distillation (Yin et al., arXiv 2405.14867).

Changes from DMD: no regression loss; two time-scale update rule (the fake score is updated
every iteration, the generator every ``update_ratio``-th, Sec. 4.1); multi-step generators
trained by backward simulation on a fixed discrete list (Sec. 4.4): pick a step k of the
list, run the student from pure noise for k steps with no grad (predict x0, re-noise with
fresh noise at the next sigma), then predict x0 at step k with grad and apply DMD's
distribution-matching loss there; the fake score trains on the same sample. The simulation
is the iteration's state (:meth:`DMD2.prepare`), shared by both groups. Inference runs the
same stochastic loop.

GAN head (Sec. 4.3; the official scripts' ``--cls_on_clean_image --gen_cls_loss
--diffusion_gan --diffusion_gan_max_timestep 1000``): a classifier on the fake score's
middle features (the UNet's bottleneck there; :meth:`Backbone.features` here) of a clean
sample re-noised at sigma ~ U[0, 1) (their timestep ~ U{0..999}), drawn anew for every
call. It is trained with the fake score, by the same optimizer and clip, on real samples
(:class:`~cdmbench.training.real_data.RealSource`: the backbone's data or ``gan_data``) against
the generator's (its non-saturating loss weighted ``fake_gan_weight``, backpropagated into
the fake score's features too); the generator adds softplus(-logit) of its own sample,
weighted ``gen_gan_weight``. Their head is convolutions down the UNet's 2-D bottleneck
(8x8 for SD1.5: two 4x4 stride-2/4 stages, GroupNorm(32), SiLU, then a 1x1 to one logit);
here the features are pooled to one vector per sample (transformers have no 2-D
bottleneck, digits' MLP none at all), so the stages are linear layers of the feature width.

Defaults are the official SDXL 4-step script (``experiments/sdxl/sdxl_cond999_8node_lr5e-7_
denoising4step_diffusion1000_gan5e-3_guidance8_noinit_noode_backsim_scratch.sh``,
``main/train_sd.py``): generator and fake lr 5e-7, AdamW betas (0.9, 0.999), weight decay
1e-2, real guidance 8.0, update ratio 5, 4-step list [999, 749, 499, 249] / 1000 = [1.0,
.75, .5, .25] pre-shift, GAN head weights 5e-3 / 1e-2, generator step before the fake
score's, warm-up 500, grad-norm clip 10. The GAN head itself is an option (``gan``, off by
default: it needs real images, which only some backbones carry); the paper variant turns it
on where the backbone has its own data (digits), the dmd2-sd3 recipe with ``gan_data``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cdmbench import flow
from cdmbench.backbones.base import Cond
from cdmbench.losses import dm_loss, fm_loss, gan_d_loss, gan_g_loss
from cdmbench.settings import MAX_COUNT, setting
from cdmbench.training.method import Batch, Core, Method, OptimSpec, SamplerSpec
from cdmbench.training.real_data import RealSource

ORDERS = ("generator_first", "fake_first")


@dataclass
class DMD2Config:
    student_lr: float = setting(5e-7, gt=0)
    fake_lr: float = setting(5e-7, ge=0)
    weight_decay: float = setting(1e-2, ge=0)
    # linear warm-up in each group's updates: train_sd.py's --warmup_step (500, a
    # constant_with_warmup schedule; accelerate steps it once per process, see the recipe)
    warmup: int = setting(500, ge=0, le=MAX_COUNT)
    clip: float = setting(10.0, gt=0)  # max grad norm of each group (--max_grad_norm 10)
    real_guidance: float = setting(8.0, ge=0)
    update_ratio: int = setting(5, ge=1, le=1000)  # fake updates per generator update (TTUR)
    # generator_first: on a generator iteration the generator steps, then the fake score
    # (train_sd.py's train_one_step: the generator's gradient reads the fake score before this
    # iteration's update, which then trains on the generator's pre-step sample); fake_first:
    # the fake score steps first and the generator reads the updated one
    order: str = setting("generator_first", choices=ORDERS)
    # backward-simulation list, pre-shift
    train_sigmas: tuple[float, ...] = setting((1.0, 0.75, 0.5, 0.25), gt=0, le=1)
    norm_floor: float = setting(1e-6, gt=0)
    # the GAN head (--cls_on_clean_image --gen_cls_loss); off unless asked, as it needs real
    # images a backbone may not have: on in the paper variant where the backbone has its own
    # data (digits) and in the dmd2-sd3 recipe (with gan_data)
    gan: bool = setting(False)
    gen_gan_weight: float = setting(5e-3, ge=0)  # --gen_cls_loss_weight (SDXL; SD1.5 1e-3)
    fake_gan_weight: float = setting(1e-2, ge=0)  # --guidance_cls_loss_weight (both)
    # real images for the GAN head: "" = the backbone's own training data (digits); else a
    # folder of images (same-name .txt captions), required on sd3/longcat when gan is on
    gan_data: str = setting("")


class GANHead(nn.Module):
    """DMD2's classifier branch on pooled features [B, C] -> one logit per sample: two
    (linear, GroupNorm, SiLU) stages at the feature width, then a linear layer to 1."""

    def __init__(self, width: int) -> None:
        super().__init__()
        groups = math.gcd(32, width)  # their GroupNorm(32), where the width allows it
        self.net = nn.Sequential(
            nn.Linear(width, width),
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.Linear(width, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).squeeze(1)


@dataclass
class Simulation:
    """One iteration's backward simulation: the student's sample x at sigma s, and its x0
    prediction there once a group has made it."""

    x: Tensor
    s: Tensor  # [B], every entry the sigma of the chosen step
    x0: Tensor | None = None  # sg(x0_S(x, s))


class DMD2(Method[Simulation]):
    """DMD2: two time-scale updates, multi-step backward simulation, GAN head (arXiv 2405.14867)."""

    name = "dmd2"
    Config = DMD2Config
    # the GAN head ("gan_head", two width x width layers: 5M parameters at SD3's 1536) is
    # left out of `cdmbench plan`, which sizes every auxiliary model as a whole network
    aux_models = {"fake": True}
    # with the GAN head: the student's forward plus the fake score's up to its middle block
    # (its generator loss); the fake score's flow-matching forward plus two half forwards
    # (real and generated samples)
    grad_forwards = {"student": 2, "fake": 2}
    backbone_defaults = {
        # digits, tuned: the paper variant (GAN head on digits' own images, generator first,
        # clip 10) with the best trial of the committed sweep (results/sweeps.jsonl: K = 16,
        # seed 0, 300 iterations, val split; trial 12): the real score near CFG 1, where the
        # teacher's FD is best
        "digits": {
            "student_lr": 0.0002,
            "fake_lr": 7.04e-05,
            "real_guidance": 1.6,
            "update_ratio": 3,
            "warmup": 8,
            "gan": True,
            "train": {"iters": 1500, "batch": 128},
        },
    }
    # `cdmbench sweep` (digits tuned = its best trial); paper (SDXL): 5e-7 / 5e-7 / 8.0 / 5
    search_space = {
        "student_lr": ("log", 3e-7, 3e-4),
        "fake_lr": ("log", 3e-7, 3e-4),
        "real_guidance": ("uniform", 1.0, 8.0),
        "update_ratio": ("int", 1, 10),
    }
    paper_defaults = {
        # The official settings on digits' own data, except what the scale forbids: their lr
        # 5e-7 moves a 1500-iteration run of a 0.6M-parameter MLP by nothing, so both networks
        # take the digits scale 1e-4 (their 1:1 ratio kept); their warm-up of 500 scheduler
        # steps ends after ~8 iterations on the 64 processes that step it (as the sd3 recipe).
        # Guidance 8, TTUR 5, weight decay 1e-2, clip 10, generator first and the GAN head
        # with weights 5e-3 / 1e-2 are theirs.
        "digits": {"student_lr": 1e-4, "fake_lr": 1e-4, "warmup": 8, "gan": True},
    }

    def build(self, core: Core) -> dict[str, nn.Module]:
        c, bb = self.config, core.backbone
        # first: a missing image folder is the user's error, before any network is copied
        self.real = RealSource(bb, c.gan_data) if c.gan else None
        fake = bb.clone(core.student).requires_grad_(True).train()
        if not c.gan:
            return {"fake": fake}
        head = GANHead(bb.feature_width(fake)).to(core.device).train()
        return {"fake": fake, "gan_head": head}

    def optim_groups(self, core: Core) -> dict[str, OptimSpec]:
        c = self.config
        also = ("gan_head",) if c.gan else ()  # the classifier trains with the fake score
        return {
            "fake": OptimSpec(
                "fake",
                lr=c.fake_lr,
                weight_decay=c.weight_decay,
                warmup=c.warmup,
                clip=c.clip,
                also=also,
            ),
            "student": OptimSpec(
                "student",
                lr=c.student_lr,
                weight_decay=c.weight_decay,
                warmup=c.warmup,
                clip=c.clip,
            ),
        }

    def groups_to_update(self, it: int) -> list[str]:
        if it % self.config.update_ratio:
            return ["fake"]
        return (
            ["student", "fake"] if self.config.order == "generator_first" else ["fake", "student"]
        )

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

    def logits(self, core: Core, x0: Tensor, cond: Cond) -> Tensor:
        """The GAN head's logits of clean samples ``x0``: re-noised at sigma ~ U[0, 1) (the
        official diffusion GAN's timestep ~ U{0..999}), read by the fake score's features."""
        s = core.rand(len(x0))
        x = flow.add_noise(x0, core.randn(*x0.shape), s)
        feats = core.backbone.features(core.models["fake"], x, s, cond)
        return core.models["gan_head"](feats)

    def losses(
        self, group: str, it: int, batch: Batch, state: Simulation, core: Core
    ) -> dict[str, Tensor]:
        c, bb = self.config, core.backbone
        if group == "student":
            x0 = bb.x0(core.student, state.x, state.s, batch.cond)
            state.x0 = x0.detach()
            tau = flow.clamp_sigma(core.rand(len(batch)))
            terms = {
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
            if c.gan:  # the fake score's (and head's) gradients from it are dropped: the fake
                # group zeroes its gradients before its own losses
                terms["gan"] = c.gen_gan_weight * gan_g_loss(self.logits(core, x0, batch.cond))
            return terms
        if state.x0 is None:  # fake-only iteration: generate without grad
            with torch.no_grad():
                state.x0 = bb.x0(core.student, state.x, state.s, batch.cond)
        tau = flow.clamp_sigma(core.rand(len(batch)))
        terms = {
            "fm": fm_loss(
                bb, core.models["fake"], state.x0, batch.cond, tau, core.randn(*state.x0.shape)
            )
        }
        if c.gan:
            real, real_cond = self.real.batch(core.randint(len(self.real), len(batch)))
            terms["gan"] = c.fake_gan_weight * gan_d_loss(
                self.logits(core, real, real_cond), self.logits(core, state.x0, batch.cond)
            )
        return terms
