"""Rectified-flow conventions shared by every module (as in SD3, Esser et al. 2024).

    x_s = (1 - s) * x0 + s * eps      s in [0, 1], s = 1 is pure noise
    v   = eps - x0                    the network predicts v
    x0  = x_s - s * v                 computed in float32
    network timestep = 1000 * s

A sampling schedule is an explicit descending list of sigmas ending in 0. Every schedule
builder takes ``shift`` explicitly and returns the post-shift list: that list is what the
network sees and what results record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x, s[B]) -> v

SIGMA_MIN, SIGMA_MAX = 0.02, 0.98  # the clamp every DMD-family method applies to sigmas


# --------------------------------------------------------------------------- broadcasting
def append_dims(x: Tensor, ndim: int) -> Tensor:
    """``x`` with trailing singleton dimensions up to ``ndim`` (a view): a per-sample [B]
    value broadcasts against [B, ...] tensors (k-diffusion's ``append_dims``)."""
    if x.ndim > ndim:
        raise ValueError(f"cannot extend a {x.ndim}-d tensor to {ndim} dimensions")
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def sigma_like(s: Tensor | float, x: Tensor) -> Tensor:
    """A sigma (a float or a per-sample [B] tensor) as float32 on ``x``'s device, broadcastable
    against ``x``; a scalar stays a scalar."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    return append_dims(s, x.ndim) if s.ndim else s


# --------------------------------------------------------------------------- conversions


def add_noise(x0: Tensor, eps: Tensor, s: Tensor | float) -> Tensor:
    """x_s = (1 - s) x0 + s eps."""
    s = sigma_like(s, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """v = eps - x0, the flow-matching regression target."""
    return eps - x0


def x0_from_v(x: Tensor, s: Tensor | float, v: Tensor) -> Tensor:
    """x0 = x_s - s v, in float32 whatever the network's dtype."""
    return x.float() - sigma_like(s, x) * v.float()


def eps_from_v(x: Tensor, s: Tensor | float, v: Tensor) -> Tensor:
    """eps = x_s + (1 - s) v."""
    return x.float() + (1 - sigma_like(s, x)) * v.float()


def v_from_x0(x: Tensor, s: Tensor | float, x0: Tensor) -> Tensor:
    """Inverse of :func:`x0_from_v` (undefined at s = 0)."""
    return (x.float() - x0.float()) / sigma_like(s, x)


def euler_step(x: Tensor, s: Tensor | float, s_next: Tensor | float, v: Tensor) -> Tensor:
    """Deterministic ODE step x_{s'} = x_s + (s' - s) v."""
    return x.float() + (sigma_like(s_next, x) - sigma_like(s, x)) * v.float()


def renoise_step(x0_hat: Tensor, s_next: Tensor | float, eps_new: Tensor) -> Tensor:
    """Stochastic step: predict x0, then re-noise it to s' with fresh noise."""
    return add_noise(x0_hat.float(), eps_new.float(), s_next)


def timestep(s: Tensor) -> Tensor:
    """The network's timestep input (SD3 convention: 1000 * s)."""
    return 1000.0 * s


def cfg(v_uncond: Tensor, v_cond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance v = v_u + w (v_c - v_u) (Ho & Salimans 2022)."""
    return v_uncond + w * (v_cond - v_uncond)


# ----------------------------------------------------------------------------- schedules
def time_shift(s: Tensor | Sequence[float] | float, shift: float) -> Tensor:
    """SD3 resolution shift s' = k s / (1 + (k - 1) s); identity for k = 1."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def unshift(sigmas: Sequence[float], shift: float) -> list[float]:
    """Inverse of :func:`time_shift`: s = s' / (k - (k - 1) s')."""
    t = torch.as_tensor(list(sigmas), dtype=torch.float64)
    return [float(v) for v in (t / (shift - (shift - 1) * t))]


def _finish(sigmas: Tensor, shift: float) -> list[float]:
    out = time_shift(sigmas, shift).tolist()
    if not out or out[-1] != 0.0:
        out.append(0.0)
    return [float(round(v, 12)) for v in out]


def explicit_schedule(sigmas: Sequence[float], shift: float = 1.0) -> list[float]:
    """A given pre-shift sigma list, shifted, with the final 0 appended if missing."""
    t = torch.as_tensor(list(sigmas), dtype=torch.float64)
    if t.numel() == 0 or t.ndim != 1:
        raise ValueError("a schedule needs at least one sigma")
    if (t < 0).any() or (t > 1).any():
        raise ValueError(f"sigmas must lie in [0, 1], got {list(sigmas)}")
    if (t[1:] >= t[:-1]).any():
        raise ValueError(f"sigmas must be strictly descending, got {list(sigmas)}")
    return _finish(t, shift)


def uniform_schedule(steps: int, shift: float = 1.0) -> list[float]:
    """``steps`` equal pre-shift intervals from 1 to 0, shifted."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return _finish(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def random_schedule(
    generator: torch.Generator,
    n_min: int = 1,
    n_max: int = 28,
    lo: float = 0.25,
    hi: float = 0.95,
    shift: float = 1.0,
    inner_generator: torch.Generator | None = None,
) -> list[float]:
    """CDM's random-length continuous schedule (arXiv 2605.06376, Sec. 3.2).

    N ~ U{n_min..n_max}; N - 1 inner sigmas ~ U(lo, hi), sorted descending; 1.0 prepended;
    shifted; 0 appended. ``generator`` draws N and must be seeded identically on every
    process so all ranks share N; ``inner_generator`` (default: ``generator``) draws the inner
    sigmas: a per-process one gives each rank its own sigmas, as the reference code does.
    """
    n = int(torch.randint(n_min, n_max + 1, (1,), generator=generator).item())
    g_in = generator if inner_generator is None else inner_generator
    inner = lo + (hi - lo) * torch.rand(n - 1, generator=g_in, dtype=torch.float64)
    inner = torch.sort(inner, descending=True).values
    return _finish(torch.cat([torch.ones(1, dtype=torch.float64), inner]), shift)


# ------------------------------------------------------------------------ sigma samplers
def sample_uniform(
    n: int, lo: float = 0.0, hi: float = 1.0, *, generator=None, device=None
) -> Tensor:
    """tau ~ U(lo, hi)."""
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def sample_logit_normal(
    n: int, mean: float = 0.0, std: float = 1.0, *, generator=None, device=None
) -> Tensor:
    """tau = sigmoid(N(mean, std)), the SD3 training density."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))


def clamp_sigma(s: Tensor, lo: float = SIGMA_MIN, hi: float = SIGMA_MAX) -> Tensor:
    """Keep sigmas away from the ends, where x0 or eps predictions are ill-conditioned."""
    return s.clamp(lo, hi)


# ------------------------------------------------------------------------------ seeding
def sample_seed(run_seed: int, prompt_id: int | str, index: int) -> int:
    """A 63-bit seed from (run seed, prompt id, sample index): independent of batch and rank."""
    h = hashlib.sha256(f"{run_seed}/{prompt_id}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def seeded_noise(
    shape: Sequence[int], seeds: Sequence[int], device=None, dtype=torch.float32
) -> Tensor:
    """Stack of per-sample standard normals, sample i drawn from its own seed."""
    out = torch.empty((len(seeds), *shape), dtype=dtype)
    g = torch.Generator()
    for i, seed in enumerate(seeds):
        g.manual_seed(int(seed))
        out[i].normal_(generator=g)  # the values torch.randn(shape, generator=g) draws, in place
    return out.to(device) if device is not None else out


# ------------------------------------------------------------------------------ sampler
@dataclass
class Trajectory:
    """What a sampler visited: ``xt[n]`` at ``sigmas[n]``, the velocity there and its x0."""

    sigmas: list[float]
    xt: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)
    x0: list[Tensor] = field(default_factory=list)


def sample(
    velocity: VelocityFn,
    noise: Tensor,
    sigmas: Sequence[float],
    *,
    stochastic: bool = False,
    renoise: Callable[[int], Tensor] | None = None,
    record: bool = False,
) -> Tensor | tuple[Tensor, Trajectory]:
    """Euler sampler over an explicit sigma list (k-diffusion style signature).

    Deterministic: x_{n+1} = x_n + (s_{n+1} - s_n) v_n. Stochastic (DMD2 / consistency
    multistep): x_{n+1} = (1 - s_{n+1}) x0_n + s_{n+1} eps, eps from ``renoise(n)``
    (default: ``randn_like``). Returns the final sample, and the trajectory if ``record``.
    """
    x = noise.float()
    traj = Trajectory(list(sigmas)) if record else None
    s_all, s_rows, ds = _schedule_tensors(sigmas, x.shape[0], x.device)
    # in place when nothing can look at the old x: no trajectory kept, no autograd graph, and
    # not the caller's noise tensor
    in_place = traj is None and not torch.is_grad_enabled()
    owned = x is not noise
    for n in range(len(sigmas) - 1):
        s = s_rows[n]
        v = velocity(x, s).float()
        if traj is not None:
            traj.xt.append(x)
            traj.v.append(v)
            traj.x0.append(x0_from_v(x, s, v))
        if stochastic and sigmas[n + 1] > 0:
            eps = renoise(n) if renoise is not None else torch.randn_like(x)
            x = renoise_step(x0_from_v(x, s, v), s_all[n + 1], eps)
        elif in_place and owned:  # the hot loop: one kernel, no allocation
            x.add_(v, alpha=ds[n])
        else:
            x = torch.add(x, v, alpha=ds[n])
        owned = True
    return (x, traj) if record else x


_SCHEDULES: dict[tuple, tuple[Tensor, tuple[Tensor, ...], list[float]]] = {}


def _schedule_tensors(
    sigmas: Sequence[float], b: int, device: torch.device
) -> tuple[Tensor, tuple[Tensor, ...], list[float]]:
    """(sigmas on device, each step's [B] sigma row, each step's s' - s) for a schedule.

    Built once per (schedule, batch, device, inference mode) and reused: evaluation samples
    every batch with the same schedule, and at batch 1 building these small tensors costs as
    much as a few network layers. s' - s is rounded to float32 as ``euler_step`` forms it and
    kept as a Python float, so an Euler step is one ``x + d v`` kernel with no device sync.
    Rows made under ``torch.inference_mode`` are inference tensors, which autograd refuses,
    hence the mode in the key.
    """
    key = (tuple(sigmas), b, str(device), torch.is_inference_mode_enabled())
    hit = _SCHEDULES.get(key)
    if hit is None:
        if len(_SCHEDULES) >= 256:
            _SCHEDULES.clear()
        s_host = torch.tensor(list(sigmas), dtype=torch.float32)
        s_all = s_host.to(device)
        hit = (s_all, s_all[:-1, None].expand(-1, b).unbind(0), (s_host[1:] - s_host[:-1]).tolist())
        _SCHEDULES[key] = hit
    return hit
