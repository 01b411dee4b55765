"""The maths of each method's losses (DESIGN.md section 5) on small tensors, and one short
distillation per method on the 2-D Gaussian mixture of ``tests/toy.py``."""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import toy
from torch import nn
from toy import Toy

from cdmbench import flow
from cdmbench.generate import SamplerSpec, generate, seeds_for
from cdmbench.losses import dm_loss, pseudo_huber
from cdmbench.methods.cd import CD, CDConfig, phase_end
from cdmbench.methods.cdm import CDM, CDMConfig
from cdmbench.methods.dmd import DMD, DMDConfig, DMDState
from cdmbench.methods.dmd2 import DMD2, DMD2Config
from cdmbench.training.core import TrainConfig, Trainer


# ------------------------------------------------------------------------------- helpers
def _trainer(method, tmp_path, batch: int = 64, backbone=None, **kw) -> Trainer:
    cfg = TrainConfig(
        **(dict(iters=10, batch=batch, seed=0, ckpt_every=10**9, log_every=10**9) | kw)
    )
    return Trainer(backbone or Toy(), method, cfg, tmp_path)


def _clone(g: torch.Generator) -> torch.Generator:
    """A generator in the same state: replays the draws the code under test makes."""
    c = torch.Generator()
    c.set_state(g.get_state())
    return c


def _v(model: nn.Module, x, s, labels) -> torch.Tensor:
    """A direct network call v(x, 1000 s, y), independent of the backbone helpers."""
    s = torch.as_tensor(s, dtype=torch.float32).expand(x.shape[0])
    return model(x, 1000.0 * s, labels)


def _x0(model, x, s, labels, w: float = 1.0) -> torch.Tensor:
    """x0 = x - s v with CFG v_u + w (v_c - v_u), written out."""
    v = _v(model, x, s, labels)
    if w != 1.0:
        vu = _v(model, x, s, torch.full_like(labels, toy.NULL_CLASS))
        v = vu + w * (v - vu)
    return x - torch.as_tensor(s, dtype=torch.float32).reshape(-1, 1) * v


def _perturb_(model: nn.Module, scale: float = 0.05, seed: int = 7) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _labels(batch) -> torch.Tensor:
    return batch.cond.tensors["label"]


# ========================================================================== CDM (5.1)
def test_cdm_random_schedule_length_start_end():
    m = CDM(CDMConfig(n_max=6))
    core = SimpleNamespace(
        g_shared=torch.Generator().manual_seed(0), backbone=SimpleNamespace(shift=1.0)
    )
    lengths = set()
    for _ in range(300):
        s = m._schedule(core)
        lengths.add(len(s) - 1)
        assert 1 <= len(s) - 1 <= 6
        assert s[0] == 1.0 and s[-1] == 0.0
        assert all(a > b for a, b in zip(s, s[1:], strict=False))
        assert all(0.25 <= v <= 0.95 for v in s[1:-1])
    assert lengths == set(range(1, 7))
    core.backbone.shift = 3.0  # the recorded list is post-shift; 1 stays 1
    lo, hi = (float(flow.time_shift(v, 3.0)) for v in (0.25, 0.95))
    for _ in range(50):
        s = m._schedule(core)
        assert s[0] == 1.0 and s[-1] == 0.0 and len(s) - 1 <= 6
        assert all(lo - 1e-9 <= v <= hi + 1e-9 for v in s[1:-1])
    fixed = CDM(CDMConfig(schedule="fixed"))._schedule(core)
    assert fixed == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


def _simulated(m: CDM, tr: Trainer, min_steps: int = 3):
    """A batch, its backward simulation (the iteration's state) and the schedule it used."""
    for _ in range(20):
        batch = tr.next_batch()
        g = _clone(tr.g_shared)
        sim = m.prepare(0, batch, tr)
        if sim.n_steps >= min_steps:
            sigmas = m._schedule(SimpleNamespace(g_shared=g, backbone=tr.backbone))
            return batch, sim, sigmas
    raise AssertionError("no schedule long enough")


def test_cdm_simulation_records_trajectory_and_fake_target(tmp_path):
    m = CDM(CDMConfig(n_max=6))
    tr = _trainer(m, tmp_path)
    batch, sim, sigmas = _simulated(m, tr)
    assert sim.n_steps == len(sigmas) - 1
    y = _labels(batch)
    # reference: the student's deterministic Euler trajectory from the batch noise
    x, xs, vs = batch.noise, [], []
    for n in range(len(sigmas) - 1):
        v = _v(tr.student, x, sigmas[n], y)
        xs.append(x)
        vs.append(v)
        x = x + (sigmas[n + 1] - sigmas[n]) * v
    s_grid = torch.tensor(sigmas[:-1], dtype=torch.float32)
    idx = (sim.s[:, None] == s_grid[None]).float().argmax(1)
    assert torch.equal(s_grid[idx], sim.s)
    assert len(set(idx.tolist())) > 1  # anchors spread over the trajectory
    rows = torch.arange(len(batch))
    xt_ref, v_ref = torch.stack(xs)[idx, rows], torch.stack(vs)[idx, rows]
    torch.testing.assert_close(sim.xt, xt_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sim.v, v_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sim.x0, sim.xt - sim.s[:, None] * sim.v)
    # the next recorded point lies on the anchor's line: xt + (s[n+1] - s[n]) v = xt[n+1]
    for n in range(len(sigmas) - 2):
        torch.testing.assert_close(xs[n] + (sigmas[n + 1] - sigmas[n]) * vs[n], xs[n + 1])

    # fake step: flow matching on x0F = the trajectory's x0 at the chosen index
    g = _clone(tr.g)
    fm = m.losses("fake", 0, batch, sim, tr)["fm"]
    b = len(batch)
    tau = torch.rand(b, generator=g).clamp(0.02, 0.98)
    eps = torch.randn((b, 2), generator=g)

    def expected(x0f):
        xt = (1 - tau[:, None]) * x0f + tau[:, None] * eps
        return F.mse_loss(_v(tr.models["fake"], xt, tau, y), eps - x0f)

    torch.testing.assert_close(fm, expected(sim.x0))
    final = torch.stack(xs)[-1] - sigmas[-2] * torch.stack(vs)[-1]  # the simulation's output
    assert not torch.allclose(fm, expected(final), rtol=1e-3, atol=0)


@pytest.mark.parametrize("capped", [False, True])
def test_cdm_offtrajectory_extrapolates_along_recorded_velocity(tmp_path, capped):
    m = CDM(CDMConfig(n_max=6, cfg_aug_scale=0.0, ontraj=False, cap_offtraj_sigma=capped))
    tr = _trainer(m, tmp_path)
    batch, sim, _ = _simulated(m, tr)
    seen = []
    hook = tr.student.register_forward_hook(lambda mod, args, out: seen.append(args))
    terms = m.losses("student", 0, batch, sim, tr)
    hook.remove()
    assert set(terms) == {"dm_off"} and len(seen) == 1  # one student forward: at (x', s')
    x_off, t, _ = seen[0]
    sp = t / 1000.0
    s, xt, v = sim.s, sim.xt, sim.v
    torch.testing.assert_close(x_off, xt + (sp - s)[:, None] * v, rtol=1e-5, atol=1e-5)
    # x' is on the straight line through the anchor: between its x0 and its implied noise
    eps_hat = xt + (1 - s)[:, None] * v
    torch.testing.assert_close(x_off, flow.add_noise(sim.x0, eps_hat, sp), rtol=1e-5, atol=1e-5)
    # sigma' = 0 gives the recorded x0 = xt - s v; sigma' = s gives the anchor itself
    torch.testing.assert_close(xt + (0 - s)[:, None] * v, sim.x0)
    torch.testing.assert_close(xt + (s - s)[:, None] * v, xt)
    assert float(sp.min()) >= 0.02 - 1e-6 and float(sp.max()) <= 0.98 + 1e-6
    if capped:
        assert bool((sp <= s + 1e-6).all())
    else:  # reference quirk: sigma' is full range, also above the anchor
        assert bool((sp > s + 1e-3).any())


def test_cdm_stop_gradients_student_and_fake_steps(tmp_path):
    m = CDM(CDMConfig(n_max=4))  # all three terms, CFG-augmentation scale 7
    tr = _trainer(m, tmp_path)
    _perturb_(tr.models["fake"])
    tr.teacher.requires_grad_(True)  # would collect gradients if anything leaked into it
    tr.ema.requires_grad_(True)
    batch = tr.next_batch()
    state = m.prepare(0, batch, tr)
    terms = m.losses("student", 0, batch, state, tr)
    assert set(terms) == {"cfg_aug", "dm_on", "dm_off"}
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in tr.student.parameters())
    assert sum(float(p.grad.norm()) for p in tr.student.parameters()) > 0
    for name in ("fake", "ema"):
        assert all(p.grad is None for p in tr.models[name].parameters()), name
    assert all(p.grad is None for p in tr.teacher.parameters())

    for p in tr.student.parameters():
        p.grad = None
    m.losses("fake", 0, batch, state, tr)["fm"].backward()
    assert all(p.grad is not None for p in tr.models["fake"].parameters())
    assert all(p.grad is None for p in tr.student.parameters())
    assert all(p.grad is None for p in tr.teacher.parameters())


def test_cdm_dm_target_value_and_detached_gradient(tmp_path):
    m = CDM(CDMConfig(n_max=4, cfg_aug_scale=0.0, offtraj=False))
    tr = _trainer(m, tmp_path)
    _perturb_(tr.models["fake"], 0.1)
    batch, sim, _ = _simulated(m, tr, min_steps=1)
    y, b = _labels(batch), len(batch)
    grads = []

    def hook(mod, args, out):
        out.register_hook(grads.append)

    h = tr.student.register_forward_hook(hook)
    g = _clone(tr.g)
    loss = m.losses("student", 0, batch, sim, tr)["dm_on"]
    h.remove()
    loss.backward()
    # replay: tau ~ U(0, 1) clamped; re-noise sg(x0s); target = x0s + (real - fake) / n
    s = sim.s
    x0s = (sim.xt - s[:, None] * _v(tr.student, sim.xt, s, y)).detach()
    tau = torch.rand(b, generator=g).clamp(0.02, 0.98)
    x_tau = (1 - tau[:, None]) * x0s + tau[:, None] * torch.randn((b, 2), generator=g)
    real, fake = _x0(tr.teacher, x_tau, tau, y), _x0(tr.models["fake"], x_tau, tau, y)
    n = (real - x0s).abs().mean(1, keepdim=True).clamp_min(0.1)
    target = x0s + (real - fake) / n
    torch.testing.assert_close(loss, F.mse_loss(x0s, target), rtol=1e-5, atol=1e-8)
    # the target is a constant: dL/dx0s = 2 (x0s - target) / numel, and v enters with -s
    (g_v,) = grads
    torch.testing.assert_close(
        g_v, -s[:, None] * 2 * (x0s - target) / x0s.numel(), rtol=1e-4, atol=1e-9
    )
    assert float(g_v.abs().max()) > 0


def test_cdm_dm_target_is_the_student_sample_when_fake_equals_teacher(tmp_path):
    m = CDM(CDMConfig(n_max=4, cfg_aug_scale=0.0))
    tr = _trainer(m, tmp_path)  # the fake starts as a copy of the student = the teacher
    batch = tr.next_batch()
    terms = m.losses("student", 0, batch, m.prepare(0, batch, tr), tr)
    assert set(terms) == {"dm_on", "dm_off"}
    assert terms["dm_on"].item() == 0.0 and terms["dm_off"].item() == 0.0
    x0s = torch.randn(len(batch), 2)
    tau = torch.full((len(batch),), 0.5)
    assert torch.equal(m._dm_target(x0s, tau, batch, tr), x0s)
    _perturb_(tr.models["fake"])
    assert not torch.equal(m._dm_target(x0s, tau, batch, tr), x0s)


@pytest.mark.parametrize(
    "kw, names",
    [
        ({}, {"cfg_aug", "dm_on", "dm_off"}),
        ({"cfg_aug_scale": 0.0}, {"dm_on", "dm_off"}),
        ({"offtraj": False}, {"cfg_aug", "dm_on"}),
        ({"ontraj": False}, {"cfg_aug", "dm_off"}),
        ({"ontraj": False, "cfg_aug_scale": 0.0}, {"dm_off"}),
        ({"offtraj": False, "cfg_aug_scale": 0.0}, {"dm_on"}),
    ],
)
def test_cdm_toggles_name_the_loss_terms(tmp_path, kw, names):
    m = CDM(CDMConfig(n_max=3, **kw))
    tr = _trainer(m, tmp_path, batch=8)
    batch = tr.next_batch()
    state = m.prepare(0, batch, tr)
    assert set(m.losses("fake", 0, batch, state, tr)) == {"fm"}
    terms = m.losses("student", 0, batch, state, tr)
    assert set(terms) == names
    assert all(t.ndim == 0 and bool(torch.isfinite(t)) for t in terms.values())


@pytest.mark.parametrize("alpha", [0.001, 0.0])
def test_cdm_after_step_merges_student_into_fake(tmp_path, alpha):
    m = CDM(CDMConfig(merge=alpha))
    tr = _trainer(m, tmp_path, batch=8)
    _perturb_(tr.models["fake"], 0.5)
    fake0 = [p.detach().clone() for p in tr.models["fake"].parameters()]
    stud = [p.detach().clone() for p in tr.student.parameters()]
    m.after_step("student", 0, tr)  # only fake steps merge
    fake = list(tr.models["fake"].parameters())
    assert all(torch.equal(p, q) for p, q in zip(fake, fake0, strict=True))
    m.after_step("fake", 0, tr)
    for p, f, s in zip(tr.models["fake"].parameters(), fake0, stud, strict=True):
        torch.testing.assert_close(p.detach(), (1 - alpha) * f + alpha * s, rtol=1e-6, atol=1e-8)
    assert all(torch.equal(p, q) for p, q in zip(tr.student.parameters(), stud, strict=True))


# ========================================================================== DMD (5.2)
def test_dmd_one_step_generator_and_zero_dm_when_fake_is_teacher(tmp_path):
    m = DMD(DMDConfig(real_guidance=1.0, reg_weight=0.0, reg_pairs=16))
    tr = _trainer(m, tmp_path)
    batch = tr.next_batch()
    state = m.prepare(0, batch, tr)
    terms = m.losses("student", 0, batch, state, tr)
    assert set(terms) == {"dm"}
    assert float(terms["dm"]) == 0.0  # fake == teacher, no CFG: the gradient vanishes
    x0_ref = batch.noise - _v(tr.student, batch.noise, 1.0, _labels(batch))
    torch.testing.assert_close(state.x0, x0_ref)
    m.config.real_guidance = 3.0  # the real score with CFG differs from the fake's
    assert float(m.losses("student", 0, batch, m.prepare(0, batch, tr), tr)["dm"]) > 0


@pytest.mark.parametrize("w", [1.0, 2.5])
def test_dmd_dm_loss_gradient_is_normalised_score_difference(w):
    bb = Toy()
    teacher = bb.load_teacher()
    fake = _perturb_(bb.clone(teacher), 0.1)
    g = torch.Generator().manual_seed(3)
    tau = torch.rand(8, generator=g).clamp(0.02, 0.98)
    eps = torch.randn((8, 2), generator=g)
    y = torch.tensor([0, 1] * 4)
    x0 = (2 * torch.randn(8, 2, generator=torch.Generator().manual_seed(4))).requires_grad_(True)
    loss = dm_loss(bb, teacher, fake, x0, bb.encode_labels(y), tau, eps, guidance=w, floor=1e-6)
    loss.backward()
    x_tau = (1 - tau[:, None]) * x0.detach() + tau[:, None] * eps
    with torch.no_grad():
        real, fk = _x0(teacher, x_tau, tau, y, w), _x0(fake, x_tau, tau, y)
    grad = (fk - real) / (x0.detach() - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(x0.grad, grad / x0.numel(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(loss.detach(), 0.5 * grad.pow(2).mean(), rtol=1e-4, atol=1e-9)
    assert float(x0.grad.abs().max()) > 0
    assert all(p.grad is None for p in fake.parameters())


def test_dmd_regression_term_on_cached_teacher_pairs(tmp_path):
    m = DMD(DMDConfig(reg_weight=0.25, reg_pairs=48, real_guidance=2.0))
    tr = _trainer(m, tmp_path, batch=16)
    noise, cond, target = m.pairs
    assert noise.shape == target.shape == (48, 2) and len(cond) == 48
    # the pairs are the teacher's 32-step Euler samples at the real score's CFG (2 here)
    y = cond.tensors["label"]
    x = noise[:6]
    sig = flow.uniform_schedule(32, 1.0)
    c6 = tr.backbone.encode_labels(y[:6])
    for n in range(32):
        v = tr.backbone.velocity(tr.teacher, x, torch.full((6,), sig[n]), c6, 2.0)
        x = x + (sig[n + 1] - sig[n]) * v if sig[n + 1] > 0 else x - sig[n] * v
    torch.testing.assert_close(target[:6], x, rtol=1e-4, atol=1e-5)

    batch = tr.next_batch()
    state = m.prepare(0, batch, tr)
    g = _clone(tr.g)
    terms = m.losses("student", 0, batch, state, tr)
    assert set(terms) == {"dm", "reg"}
    torch.rand(16, generator=g), torch.randn((16, 2), generator=g)  # the DM term's draws
    idx = torch.randint(0, 48, (16,), generator=g)
    pred = noise[idx] - _v(tr.student, noise[idx], 1.0, y[idx])
    torch.testing.assert_close(terms["reg"], 0.25 * F.mse_loss(pred, target[idx]))
    assert float(terms["reg"]) > 0  # a 1-step student is not yet the 32-step teacher
    m.config.reg_weight = 0.0
    batch = tr.next_batch()
    assert set(m.losses("student", 0, batch, m.prepare(0, batch, tr), tr)) == {"dm"}


def test_dmd_fake_group_does_not_depend_on_the_student_group_running_first(tmp_path):
    m = DMD(DMDConfig(reg_weight=0.0, reg_pairs=16))
    tr = _trainer(m, tmp_path)
    _perturb_(tr.models["fake"])
    batch = tr.next_batch()
    g = _clone(tr.g)
    alone = DMDState()  # the fake group first: it makes the sample itself, without grad
    fm_alone = m.losses("fake", 0, batch, alone, tr)["fm"]
    assert alone.x0 is not None and not alone.x0.requires_grad
    after = m.prepare(0, batch, tr)
    m.losses("student", 0, batch, after, tr)  # the student group first fills the state
    assert torch.equal(after.x0, alone.x0)
    tr.g.set_state(g.get_state())
    assert torch.equal(m.losses("fake", 0, batch, after, tr)["fm"], fm_alone)


# ========================================================================= DMD2 (5.2)
def test_dmd2_backward_simulation_lands_on_train_sigmas(tmp_path):
    bb = Toy()
    bb.shift = 3.0  # the list the student sees is the post-shift one
    m = DMD2(DMD2Config(gan=False))
    tr = _trainer(m, tmp_path, batch=8, backbone=bb)
    sig = flow.explicit_schedule((1.0, 0.75, 0.5, 0.25), 3.0)
    assert sig == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    landed = set()
    for _ in range(24):
        batch = tr.next_batch()
        gs, g = _clone(tr.g_shared), _clone(tr.g)
        sim = m.prepare(0, batch, tr)
        x, s = sim.x, sim.s
        k = int(torch.randint(0, 4, (1,), generator=gs))
        assert torch.equal(s, torch.full((8,), sig[k], dtype=torch.float32))
        landed.add(k)
        # replay: k student steps from noise, each predicting x0 and re-noising to the next sigma
        xr, y = batch.noise, _labels(batch)
        for j in range(k):
            x0 = xr - sig[j] * _v(tr.student, xr, sig[j], y)
            xr = (1 - sig[j + 1]) * x0 + sig[j + 1] * torch.randn((8, 2), generator=g)
        torch.testing.assert_close(x, xr, rtol=1e-5, atol=1e-6)
    assert landed == {0, 1, 2, 3}


def test_dmd2_cadence_and_losses(tmp_path):
    m = DMD2(DMD2Config(real_guidance=1.0, gan=False))
    assert [it for it in range(16) if "student" in m.groups_to_update(it)] == [0, 5, 10, 15]
    assert all("fake" in m.groups_to_update(it) for it in range(16))
    tr = _trainer(m, tmp_path, batch=8)
    batch = tr.next_batch()
    state = m.prepare(0, batch, tr)
    terms = m.losses("student", 0, batch, state, tr)
    assert set(terms) == {"dm"} and float(terms["dm"]) == 0.0  # fake == teacher, no CFG
    assert set(m.losses("fake", 0, batch, state, tr)) == {"fm"}
    fake_only = tr.next_batch()  # a fake-only iteration generates its own sample
    state = m.prepare(1, fake_only, tr)
    assert set(m.losses("fake", 1, fake_only, state, tr)) == {"fm"} and state.x0 is not None
    assert m.sampler(4, 1.0).stochastic and m.sampler(4, 1.0).sigmas == [1.0, 0.75, 0.5, 0.25, 0.0]


# =========================================================================== CD (5.3)
def test_cd_phase_end_for_every_grid_index():
    n = torch.arange(50)
    ends = phase_end(n, (0, 12, 25, 37), 50)
    expected = [12] * 12 + [25] * 13 + [37] * 12 + [50] * 13
    assert ends.tolist() == expected
    assert ends[11] == 12 and ends[12] == 25 and ends[36] == 37 and ends[37] == 50
    assert ends[49] == 50
    assert phase_end(n, (0,), 50).tolist() == [50] * 50


def test_cd_pseudo_huber():
    c = 1e-3
    d = torch.tensor([-3.0, -0.2, 0.0, 1e-4, 0.7, 10.0])
    target = torch.linspace(-1, 1, 6)
    pred = target + d
    torch.testing.assert_close(pseudo_huber(pred, target, c), (torch.sqrt(d**2 + c**2) - c).mean())
    assert float(pseudo_huber(pred, target, c)) == pytest.approx(
        float(pseudo_huber(target, pred, c))
    )
    big = torch.tensor([5.0, -8.0])
    assert float(pseudo_huber(big, torch.zeros(2), c)) == pytest.approx(6.5 - c, rel=1e-6)
    small = torch.tensor([2e-5, -4e-5])
    quad = float((small**2 / (2 * c)).mean())
    assert float(pseudo_huber(small, torch.zeros(2), c)) == pytest.approx(quad, rel=2e-2)
    assert float(pseudo_huber(target, target, c)) == 0.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_cd_sampler_jumps_between_phase_edges(shift):
    m = CD(CDConfig())
    grid = flow.uniform_schedule(50, shift)
    spec = m.sampler(4, shift)
    assert spec.sigmas == [grid[0], grid[12], grid[25], grid[37], 0.0]
    assert not spec.stochastic
    if shift == 1.0:
        assert spec.sigmas == pytest.approx([1.0, 0.76, 0.5, 0.26, 0.0])
    assert m.sampler(2, shift).sigmas == flow.uniform_schedule(2, shift)


MU = torch.tensor([0.5, -1.0])


class ExactField(nn.Module):
    """The exact flow of a point mass at MU: v(x, s) = scale (x - MU) / s (straight lines)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, t, y):
        s = (t.float() / 1000.0).clamp_min(1e-6)[:, None]
        return self.scale * (x - MU) / s


class PointMass(Toy):
    def load_teacher(self, weights=None):
        return ExactField().requires_grad_(False)

    def real_latents(self, split="train"):
        return MU.expand(64, 2).clone(), torch.arange(64) % 2


@pytest.mark.parametrize("target", ["ema", "online"])
@pytest.mark.parametrize("edges", [(0, 12, 25, 37), (0,)])
def test_cd_target_equals_prediction_on_an_exact_straight_field(tmp_path, target, edges):
    m = CD(CDConfig(target=target, edges=edges))
    tr = _trainer(m, tmp_path, batch=128, backbone=PointMass())
    assert m.w == 1.0  # the backbone's default CFG
    assert ("target" in tr.models) == (target == "ema")
    loss = m.losses("student", 0, tr.next_batch(), None, tr)["huber"]
    assert float(loss) < 1e-8  # pred == target up to rounding (Huber ~ d^2 / 2c)
    with torch.no_grad():
        tr.student.scale.fill_(1.2)  # a wrong student: its jump misses the teacher's
    assert float(m.losses("student", 0, tr.next_batch(), None, tr)["huber"]) > 1e-3


# ============================================== distillation on the 2-D Gaussian mixture
@lru_cache(maxsize=1)
def _eval_set():
    bb = Toy()
    items = seeds_for(0, bb.prompts(), 512)
    prompts, seeds = [p for p, _, _ in items], [s for _, _, s in items]
    return prompts, seeds, torch.tensor([p.label for p in prompts])


def _mode_distance(model: nn.Module, spec: SamplerSpec) -> float:
    prompts, seeds, labels = _eval_set()
    return float(toy.mode_distance(generate(Toy(), model, prompts, seeds, spec), labels))


def test_toy_teacher_many_steps_sits_on_the_modes():
    teacher = Toy().load_teacher()
    one = _mode_distance(teacher, SamplerSpec(flow.uniform_schedule(1)))
    many = _mode_distance(teacher, SamplerSpec(flow.uniform_schedule(32)))
    assert many < 0.35 < 1.0 < one  # 1 step is (near) the class mean, sqrt(2) from the modes
    assert not any(p.requires_grad for p in teacher.parameters())
    assert Toy().load_teacher() is not Toy().load_teacher()


GMM_RUNS = {
    # method, iterations: scaled for a 2-D toy (lr 1e-3 range, short warm-up, short schedules)
    "cdm": (
        lambda: CDM(
            CDMConfig(student_lr=5e-4, fake_lr=3e-3, warmup=10, n_max=4, cfg_aug_scale=0.0)
        ),
        250,
    ),
    "dmd": (
        lambda: DMD(
            DMDConfig(
                student_lr=5e-4,
                fake_lr=3e-3,
                warmup=10,
                real_guidance=1.0,
                reg_weight=0.0,
                reg_pairs=256,
            )
        ),
        200,
    ),
    "dmd-reg": (
        lambda: DMD(
            DMDConfig(
                student_lr=5e-4,
                fake_lr=3e-3,
                warmup=10,
                real_guidance=1.0,
                reg_weight=0.25,
                reg_pairs=512,
            )
        ),
        150,
    ),
    "dmd2": (
        lambda: DMD2(
            DMD2Config(
                student_lr=1e-3,
                fake_lr=3e-3,
                warmup=10,
                real_guidance=1.0,
                weight_decay=1e-4,
                gan=False,
            )
        ),
        400,
    ),
    # one phase (edges (0,)) makes the 1-step sampler the trained jump; a 10-point grid
    "cd": (lambda: CD(CDConfig(student_lr=1e-3, warmup=10, grid=10, edges=(0,))), 250),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GMM_RUNS))
def test_student_one_step_moves_to_the_mixture_modes(tmp_path, name):
    make, iters = GMM_RUNS[name]
    method = make()
    tr = Trainer(
        Toy(),
        method,
        TrainConfig(iters=iters, batch=256, seed=0, ckpt_every=10**9, log_every=50),
        tmp_path,
    )
    spec = method.sampler(1, tr.backbone.shift)
    assert spec.sigmas == [1.0, 0.0]
    teacher = _mode_distance(tr.teacher, spec)
    tr.train()
    student = _mode_distance(tr.student, spec)
    assert student < 0.6 * teacher, f"{name}: student {student:.3f} vs teacher {teacher:.3f}"
