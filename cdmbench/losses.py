"""The losses distillation methods share, in the conventions of :mod:`cdmbench.flow`.

Plain functions over tensors and models: randomness (the re-noising sigma ``tau`` and
noise ``eps``) is drawn by the caller and passed in, so a method decides the draw order and
a test can replay it.

    fm_loss          flow-matching MSE  ||v(x_tau) - (eps - x0)||^2       fake score
    dm_normalizer    n = max(mean |x0_real - x0|, floor), per sample       DMD Eq. 8
    dm_target        sg(x0) + (x0_real - x0_fake) / n                      DMD Eq. 7-8
    dm_loss          0.5 MSE(x0, dm_target)                                DMD Eq. 7-8
    regression_loss  MSE(x0_S(noise), x0_teacher(noise))                  DMD Sec. 3.3
    pseudo_huber     mean(sqrt((pred - target)^2 + c^2) - c)               Song & Dhariwal 2023
    gan_d_loss       softplus(l_fake) + softplus(-l_real), means           DMD2 Sec. 4.3
    gan_g_loss       softplus(-l_fake), mean                               DMD2 Sec. 4.3
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdmbench import flow
from cdmbench.backbones.base import Backbone, Cond


def fm_loss(
    backbone: Backbone, model: nn.Module, x0: Tensor, cond: Cond, tau: Tensor, eps: Tensor
) -> Tensor:
    """Flow-matching MSE of ``model`` on clean samples ``x0`` at ``tau`` (the fake-score
    objective): ``x0`` re-noised with ``eps``, velocity target eps - x0."""
    xt = flow.add_noise(x0, eps, tau)
    v = backbone.velocity(model, xt, tau, cond)
    return F.mse_loss(v, flow.velocity_target(x0, eps))


def dm_normalizer(x0_ref: Tensor, x0: Tensor, floor: float = 0.0) -> Tensor:
    """Per-sample max(mean |x0_ref - x0|, floor), broadcastable to x0 (DMD Eq. 8; CDM floors
    it at 0.1)."""
    n = (x0_ref - x0).abs().flatten(1).mean(1).clamp_min(floor)
    return flow.append_dims(n, x0.ndim)


@torch.no_grad()
def dm_target(
    backbone: Backbone,
    real: nn.Module,
    fake: nn.Module,
    x0: Tensor,
    cond: Cond,
    tau: Tensor,
    eps: Tensor,
    guidance: float = 1.0,
    floor: float = 0.0,
) -> Tensor:
    """The distribution-matching target sg(x0) + (x0_real - x0_fake) / n (DMD Eq. 7-8).

    x0 is re-noised to ``tau`` with ``eps``; the real score (``real``, at CFG ``guidance``)
    and the fake score predict x0 there; n is :func:`dm_normalizer` of the real prediction.
    Regressing x0 onto it moves x0 along the normalised score difference.
    """
    x0 = x0.detach()
    x_tau = flow.add_noise(x0, eps, tau)
    x0_real = backbone.x0(real, x_tau, tau, cond, guidance)
    x0_fake = backbone.x0(fake, x_tau, tau, cond)
    return x0 + (x0_real - x0_fake) / dm_normalizer(x0_real, x0, floor)


def dm_loss(
    backbone: Backbone,
    real: nn.Module,
    fake: nn.Module,
    x0: Tensor,
    cond: Cond,
    tau: Tensor,
    eps: Tensor,
    guidance: float = 1.0,
    floor: float = 0.0,
) -> Tensor:
    """DMD's distribution-matching loss 0.5 MSE(x0, :func:`dm_target`) (Eq. 7-8): its
    gradient in x0 is the normalised score difference (x0_fake - x0_real) / n, over numel."""
    target = dm_target(backbone, real, fake, x0, cond, tau, eps, guidance, floor)
    return 0.5 * F.mse_loss(x0, target)


def regression_loss(
    backbone: Backbone, student: nn.Module, noise: Tensor, cond: Cond, target: Tensor
) -> Tensor:
    """MSE between the one-step student's x0 from ``noise`` and the teacher's ODE sample from
    the same noise (DMD Sec. 3.3, in latent space where the paper uses LPIPS)."""
    pred = backbone.x0(student, noise, torch.ones(len(noise), device=noise.device), cond)
    return F.mse_loss(pred, target)


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """mean(sqrt((pred - target)^2 + c^2) - c) (Song & Dhariwal 2023; as in LCM/PCM code)."""
    return (torch.sqrt((pred.float() - target.float()) ** 2 + c * c) - c).mean()


def gan_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The classifier's non-saturating loss: mean softplus(-l) on real samples plus mean
    softplus(l) on generated ones (-log sigmoid on real, -log(1 - sigmoid) on fake; DMD2
    Eq. 6, tianweiy/DMD2 ``compute_guidance_clean_cls_loss``)."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def gan_g_loss(fake_logits: Tensor) -> Tensor:
    """The generator's non-saturating loss: mean softplus(-l) on its samples' logits (DMD2
    Eq. 6, tianweiy/DMD2 ``compute_generator_clean_cls_loss``)."""
    return F.softplus(-fake_logits.float()).mean()
