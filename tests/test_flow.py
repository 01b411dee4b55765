"""Rectified-flow maths (DESIGN.md section 2) checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from cdmbench import flow


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(shape=(4, 3, 5, 5), seed: int = 0):
    g = _gen(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# --------------------------------------------------------------------------- conversions
def test_add_noise_endpoints_and_midpoint():
    x0, eps = _pair()
    torch.testing.assert_close(flow.add_noise(x0, eps, 0.0), x0)
    torch.testing.assert_close(flow.add_noise(x0, eps, 1.0), eps)
    torch.testing.assert_close(flow.add_noise(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps)


def test_add_noise_per_sample_sigma_broadcasts_over_batch():
    x0, eps = _pair()
    s = torch.tensor([0.0, 0.3, 0.7, 1.0])
    xs = flow.add_noise(x0, eps, s)
    assert xs.shape == x0.shape
    for i, si in enumerate(s.tolist()):
        torch.testing.assert_close(xs[i], (1 - si) * x0[i] + si * eps[i])


def test_velocity_target_is_eps_minus_x0():
    x0, eps = _pair()
    torch.testing.assert_close(flow.velocity_target(x0, eps), eps - x0)


@pytest.mark.parametrize("s", [0.02, 0.3, 0.5, 0.98, 1.0])
def test_round_trips_scalar_sigma(s):
    x0, eps = _pair()
    v = flow.velocity_target(x0, eps)
    xs = flow.add_noise(x0, eps, s)
    torch.testing.assert_close(flow.x0_from_v(xs, s, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.eps_from_v(xs, s, v), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.v_from_x0(xs, s, x0), v, atol=1e-4, rtol=1e-4)
    # x0_from_v and v_from_x0 are inverses of each other at fixed (x, s)
    torch.testing.assert_close(
        flow.x0_from_v(xs, s, flow.v_from_x0(xs, s, x0)), x0, atol=1e-5, rtol=1e-5
    )


def test_round_trips_per_sample_sigma():
    x0, eps = _pair()
    s = torch.tensor([0.1, 0.4, 0.6, 0.9])
    v = flow.velocity_target(x0, eps)
    xs = flow.add_noise(x0, eps, s)
    torch.testing.assert_close(flow.x0_from_v(xs, s, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.eps_from_v(xs, s, v), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.v_from_x0(xs, s, x0), v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_conversions_return_float32(dtype):
    x0, eps = _pair()
    x0, eps = x0.to(dtype), eps.to(dtype)
    v = (eps - x0).to(dtype)
    xs = flow.add_noise(x0, eps, torch.full((4,), 0.5)).to(dtype)
    s = torch.full((4,), 0.5)
    assert flow.x0_from_v(xs, s, v).dtype == torch.float32
    assert flow.x0_from_v(xs, 0.5, v).dtype == torch.float32
    assert flow.eps_from_v(xs, 0.5, v).dtype == torch.float32
    assert flow.v_from_x0(xs, 0.5, x0).dtype == torch.float32
    assert flow.euler_step(xs, 0.5, 0.25, v).dtype == torch.float32
    assert flow.renoise_step(x0, 0.25, eps).dtype == torch.float32
    # and the value is what float32 arithmetic on the upcast inputs gives
    torch.testing.assert_close(flow.x0_from_v(xs, 0.5, v), xs.float() - 0.5 * v.float())


def test_x0_from_v_computes_in_float32_not_in_bf16():
    # 1 - 2**-9 needs 9 significant bits: representable in float32, not in bfloat16 (8 bits).
    x = torch.ones(2, 3, dtype=torch.bfloat16)
    v = torch.full((2, 3), 2.0**-8, dtype=torch.bfloat16)
    out = flow.x0_from_v(x, 0.5, v)
    assert torch.all(out == 1.0 - 2.0**-9)
    out = flow.euler_step(x, 0.5, 0.0, v)
    assert torch.all(out == 1.0 - 2.0**-9)


def test_euler_step_identity_and_closed_form():
    x0, eps = _pair()
    v = eps - x0
    # s' = s: no move
    torch.testing.assert_close(flow.euler_step(eps, 0.7, 0.7, v), eps)
    # on the straight rectified path, one Euler step from any s lands on x_{s'} exactly
    for s, s_next in [(1.0, 0.0), (1.0, 0.6), (0.6, 0.2), (0.3, 0.0)]:
        xs = flow.add_noise(x0, eps, s)
        torch.testing.assert_close(
            flow.euler_step(xs, s, s_next, v), flow.add_noise(x0, eps, s_next), atol=1e-5, rtol=1e-5
        )
    # to s' = 0 the Euler step equals the x0 prediction
    xs = flow.add_noise(x0, eps, 0.4)
    torch.testing.assert_close(flow.euler_step(xs, 0.4, 0.0, v), flow.x0_from_v(xs, 0.4, v))


def test_euler_step_per_sample_sigmas():
    x, v = _pair()
    s = torch.tensor([1.0, 0.8, 0.5, 0.2])
    s_next = torch.tensor([0.5, 0.8, 0.0, 0.1])
    out = flow.euler_step(x, s, s_next, v)
    for i in range(4):
        torch.testing.assert_close(out[i], x[i] + (s_next[i] - s[i]) * v[i])


def test_euler_step_matches_the_written_out_update_bit_for_bit():
    # methods step off the grid with per-sample sigmas (CD's phase-end projection, CDM's
    # off-trajectory point); the helper must give exactly x + (s' - s) v as written out
    x, v = _pair((6, 1, 8, 8), seed=3)
    g = _gen(4)
    s, s_next = torch.rand(6, generator=g), torch.rand(6, generator=g)
    written = x + (s_next - s).view(-1, 1, 1, 1) * v
    assert torch.equal(flow.euler_step(x, s, s_next, v), written)


def test_append_dims_and_sigma_like_broadcast_per_sample_values():
    s = torch.tensor([0.1, 0.2, 0.3])
    assert flow.append_dims(s, 4).shape == (3, 1, 1, 1)
    assert flow.append_dims(s, 1).shape == (3,)
    assert flow.append_dims(s, 4).data_ptr() == s.data_ptr()  # a view
    with pytest.raises(ValueError):
        flow.append_dims(torch.zeros(2, 3), 1)
    x = torch.zeros(3, 2, 5, dtype=torch.bfloat16)
    b = flow.sigma_like(s.double(), x)
    assert b.shape == (3, 1, 1) and b.dtype == torch.float32
    assert torch.equal(b.flatten(), s)
    scalar = flow.sigma_like(0.5, x)
    assert scalar.ndim == 0 and scalar.dtype == torch.float32 and float(scalar) == 0.5


def test_renoise_step_formula():
    x0, eps = _pair()
    torch.testing.assert_close(flow.renoise_step(x0, 0.3, eps), 0.7 * x0 + 0.3 * eps)


def test_timestep_is_1000_s():
    s = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(flow.timestep(s), torch.tensor([0.0, 250.0, 1000.0]))


def test_cfg_formula():
    vu, vc = _pair()
    torch.testing.assert_close(flow.cfg(vu, vc, 1.0), vc)
    torch.testing.assert_close(flow.cfg(vu, vc, 0.0), vu)
    torch.testing.assert_close(flow.cfg(vu, vc, 3.5), vu + 3.5 * (vc - vu))
    torch.testing.assert_close(flow.cfg(vu, vc, 2.0), 2 * vc - vu)


# ----------------------------------------------------------------------------- sampler
SCHEDULES = [
    [1.0, 0.0],
    [1.0, 0.5, 0.0],
    [1.0, 0.75, 0.5, 0.25, 0.0],
    [1.0, 0.9, 0.75, 0.5, 0.0],
    flow.uniform_schedule(7, shift=3.0),
]


@pytest.mark.parametrize("sigmas", SCHEDULES)
def test_sample_constant_velocity(sigmas):
    noise, c = _pair()
    out = flow.sample(lambda x, s: c.expand_as(x), noise, sigmas)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, noise - c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sigmas", SCHEDULES)
def test_sample_exact_rectified_field_lands_on_x0(sigmas):
    """v(x, s) = (x - x0) / s is the exact flow to a fixed x0: every Euler schedule is exact."""
    noise, x0 = _pair(seed=1)

    def velocity(x, s):
        return (x - x0) / s.view(-1, 1, 1, 1)

    out, traj = flow.sample(velocity, noise, sigmas, record=True)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    # and every visited state is on the straight line between x0 and the noise
    for n, s in enumerate(sigmas[:-1]):
        torch.testing.assert_close(traj.xt[n], flow.add_noise(x0, noise, s), atol=1e-5, rtol=1e-5)


def test_sample_passes_batch_sigma_to_velocity():
    noise, _ = _pair()
    seen = []

    def velocity(x, s):
        seen.append(s.clone())
        return torch.zeros_like(x)

    sigmas = [1.0, 0.9, 0.75, 0.5, 0.0]
    flow.sample(velocity, noise, sigmas)
    assert len(seen) == len(sigmas) - 1
    for s, expected in zip(seen, sigmas[:-1], strict=True):
        assert s.shape == (noise.shape[0],)
        assert s.dtype == torch.float32
        torch.testing.assert_close(s, torch.full((noise.shape[0],), expected))


def test_sample_float32_output_for_other_input_dtypes():
    noise, c = _pair()
    for dtype in (torch.bfloat16, torch.float64):
        cd = c.to(dtype)
        out = flow.sample(lambda x, s, cd=cd: cd.expand_as(x), noise.to(dtype), [1.0, 0.5, 0.0])
        assert out.dtype == torch.float32


def _nonlinear_velocity(x, s):
    return torch.sin(3 * x) * s.view(-1, 1, 1, 1) + 0.3 * x - 0.1


def test_sample_record_trajectory_contents():
    noise, _ = _pair(seed=2)
    sigmas = [1.0, 0.8, 0.45, 0.2, 0.0]
    out, traj = flow.sample(_nonlinear_velocity, noise, sigmas, record=True)
    assert traj.sigmas == sigmas
    assert len(traj.xt) == len(traj.v) == len(traj.x0) == len(sigmas) - 1
    torch.testing.assert_close(traj.xt[0], noise)
    for n in range(len(sigmas) - 1):
        s = torch.full((noise.shape[0],), sigmas[n])
        torch.testing.assert_close(traj.v[n], _nonlinear_velocity(traj.xt[n], s))
        torch.testing.assert_close(traj.x0[n], traj.xt[n] - sigmas[n] * traj.v[n])
        nxt = traj.xt[n + 1] if n + 1 < len(traj.xt) else out
        torch.testing.assert_close(nxt, traj.xt[n] + (sigmas[n + 1] - sigmas[n]) * traj.v[n])
    # the last step to sigma = 0 returns the last x0 prediction
    torch.testing.assert_close(out, traj.x0[-1])
    # record=False returns the same sample
    torch.testing.assert_close(flow.sample(_nonlinear_velocity, noise, sigmas), out)


def test_sample_stochastic_renoise_formula():
    noise, _ = _pair(seed=3)
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    fresh = [torch.randn(noise.shape, generator=_gen(100 + j)) for j in range(len(sigmas))]
    calls = []

    def renoise(n):
        calls.append(n)
        return fresh[n]

    out, traj = flow.sample(
        _nonlinear_velocity, noise, sigmas, stochastic=True, renoise=renoise, record=True
    )
    # fresh noise is drawn for every step that does not end at sigma = 0
    assert calls == [0, 1, 2]
    # reference loop: x0 = x - s v; x_{n+1} = (1 - s') x0 + s' eps_n; the last step returns x0
    x = noise.clone()
    for n in range(len(sigmas) - 1):
        s, s_next = sigmas[n], sigmas[n + 1]
        v = _nonlinear_velocity(x, torch.full((x.shape[0],), s))
        x0 = x - s * v
        torch.testing.assert_close(traj.xt[n], x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(traj.x0[n], x0, atol=1e-5, rtol=1e-5)
        x = (1 - s_next) * x0 + s_next * fresh[n] if s_next > 0 else x0
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)
    # and it is not the deterministic Euler sample
    assert not torch.allclose(out, flow.sample(_nonlinear_velocity, noise, sigmas), atol=1e-3)


def test_sample_stochastic_exact_field_lands_on_x0_for_any_fresh_noise():
    noise, x0 = _pair(seed=4)
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    fresh = [torch.randn(noise.shape, generator=_gen(200 + j)) for j in range(4)]

    def velocity(x, s):
        return (x - x0) / s.view(-1, 1, 1, 1)

    out, traj = flow.sample(
        velocity, noise, sigmas, stochastic=True, renoise=lambda n: fresh[n], record=True
    )
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    for n in range(1, len(sigmas) - 1):  # x_{n} = (1 - s_n) x0 + s_n eps_{n-1}
        torch.testing.assert_close(
            traj.xt[n], flow.add_noise(x0, fresh[n - 1], sigmas[n]), atol=1e-5, rtol=1e-5
        )


def test_sample_rows_independent_of_batch_with_seeded_noise():
    """Per-sample seeds (DESIGN.md section 2): a row's sample does not depend on its batch."""
    seeds = [flow.sample_seed(0, f"p{i}", 0) for i in range(5)]
    shape = (1, 4, 4)
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]

    def run(ss):
        def renoise(j):
            return flow.seeded_noise(shape, [flow.sample_seed(s, "renoise", j) for s in ss])

        return flow.sample(
            _nonlinear_velocity,
            flow.seeded_noise(shape, ss),
            sigmas,
            stochastic=True,
            renoise=renoise,
        )

    full = run(seeds)
    parts = torch.cat([run(seeds[:2]), run(seeds[2:3]), run(seeds[3:])])
    torch.testing.assert_close(full, parts, atol=0, rtol=0)


# ----------------------------------------------------------------------------- schedules
def test_time_shift_known_values():
    out = flow.time_shift([1.0, 0.75, 0.5, 0.25], 3.0)
    assert out.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5], abs=1e-12)
    assert flow.time_shift(0.0, 3.0).item() == 0.0
    assert flow.time_shift(1.0, 3.0).item() == 1.0
    # closed form at another shift
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(flow.time_shift(s, 2.0), 2 * s / (1 + s))


def test_time_shift_identity_and_monotone():
    s = torch.linspace(0, 1, 21, dtype=torch.float64)
    torch.testing.assert_close(flow.time_shift(s, 1.0), s)
    for k in (0.5, 3.0, 6.0):
        out = flow.time_shift(s, k)
        assert torch.all(out[1:] > out[:-1])
        # k > 1 moves sigmas towards noise, k < 1 towards data
        inner = slice(1, -1)
        assert torch.all(out[inner] > s[inner]) if k > 1 else torch.all(out[inner] < s[inner])


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_unshift_inverts_time_shift(shift):
    s = [1.0, 0.9, 0.62, 0.3, 0.05, 0.0]
    back = flow.unshift(flow.time_shift(s, shift).tolist(), shift)
    assert isinstance(back, list) and back == pytest.approx(s, abs=1e-12)
    # the SD3 pipeline's published 4-step list at shift 3
    assert flow.unshift([1.0, 0.9, 0.75, 0.5], 3.0) == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_explicit_schedule_sd3_published_list():
    assert flow.explicit_schedule([1.0, 0.75, 0.5, 0.25], shift=3.0) == [1.0, 0.9, 0.75, 0.5, 0.0]
    assert flow.explicit_schedule([1.0, 0.75, 0.5, 0.25]) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert flow.explicit_schedule((1.0, 0.75, 0.5, 0.25), shift=1.0) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_explicit_schedule_keeps_a_final_zero_once():
    assert flow.explicit_schedule([1.0, 0.5, 0.0]) == [1.0, 0.5, 0.0]
    assert flow.explicit_schedule([1.0, 0.5, 0.0], shift=3.0) == [1.0, 0.75, 0.0]


@pytest.mark.parametrize(
    "bad",
    [
        [],
        [0.5, 1.0],
        [1.0, 1.0, 0.5],
        [1.0, 0.5, 0.6],
        [1.5, 0.5],
        [1.0, -0.1],
        [[1.0, 0.5]],
    ],
)
def test_explicit_schedule_rejects_bad_lists(bad):
    with pytest.raises(ValueError):
        flow.explicit_schedule(bad)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_uniform_schedule(steps, shift):
    sched = flow.uniform_schedule(steps, shift)
    assert len(sched) == steps + 1
    assert sched[0] == 1.0 and sched[-1] == 0.0
    assert all(a > b for a, b in zip(sched, sched[1:], strict=False))
    pre = [1 - i / steps for i in range(steps + 1)]
    assert sched == pytest.approx(flow.time_shift(pre, shift).tolist(), abs=1e-11)
    assert all(isinstance(v, float) for v in sched)


def test_uniform_schedule_rejects_zero_steps():
    with pytest.raises(ValueError):
        flow.uniform_schedule(0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_random_schedule_properties(shift):
    g = _gen(1234)
    n_max, lo, hi = 6, 0.25, 0.95
    lo_s, hi_s = flow.time_shift(lo, shift).item(), flow.time_shift(hi, shift).item()
    lengths = set()
    for _ in range(400):
        sched = flow.random_schedule(g, 1, n_max, lo, hi, shift)
        n = len(sched) - 1  # number of steps
        lengths.add(n)
        assert 1 <= n <= n_max
        assert sched[0] == 1.0
        assert sched[-1] == 0.0
        for v in sched[1:-1]:
            assert lo_s - 1e-12 <= v <= hi_s + 1e-12
        assert all(a >= b for a, b in zip(sched, sched[1:], strict=False))
        assert sched[-2] > 0.0
    # every length in 1..n_max is drawn (no off-by-one at either end)
    assert lengths == set(range(1, n_max + 1))


def test_random_schedule_n_min_and_defaults():
    g = _gen(7)
    for _ in range(100):
        sched = flow.random_schedule(g, n_min=3, n_max=4)
        assert len(sched) - 1 in (3, 4)
    g = _gen(8)
    lengths = {len(flow.random_schedule(g)) - 1 for _ in range(300)}
    assert min(lengths) >= 1 and max(lengths) <= 28
    assert max(lengths) > 20  # the default n_max is 28


def test_random_schedule_inner_values_are_uniform_on_lo_hi():
    g = _gen(9)
    inner = []
    for _ in range(300):
        inner += flow.random_schedule(g, 1, 8, 0.25, 0.95, 1.0)[1:-1]
    inner = torch.tensor(inner, dtype=torch.float64)
    assert inner.numel() > 500
    assert abs(inner.mean().item() - 0.6) < 0.03
    assert inner.min().item() < 0.3 and inner.max().item() > 0.9


def test_random_schedule_same_seed_same_schedules():
    a, b, c = _gen(42), _gen(42), _gen(43)
    sa = [flow.random_schedule(a, 1, 28, shift=3.0) for _ in range(20)]
    sb = [flow.random_schedule(b, 1, 28, shift=3.0) for _ in range(20)]
    sc = [flow.random_schedule(c, 1, 28, shift=3.0) for _ in range(20)]
    assert sa == sb
    assert sa != sc


def test_random_schedule_is_accepted_by_the_sampler():
    g = _gen(5)
    noise, x0 = _pair(seed=5)
    for _ in range(10):
        sched = flow.random_schedule(g, 1, 8, shift=3.0)
        out = flow.sample(lambda x, s: (x - x0) / s.view(-1, 1, 1, 1), noise, sched)
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ sigma samplers
def test_sample_uniform_range_and_mean():
    t = flow.sample_uniform(20000, 0.2, 0.5, generator=_gen(0))
    assert t.shape == (20000,)
    assert t.min().item() >= 0.2 and t.max().item() < 0.5
    assert abs(t.mean().item() - 0.35) < 0.005
    t = flow.sample_uniform(20000, generator=_gen(1))
    assert t.min().item() >= 0.0 and t.max().item() < 1.0
    assert abs(t.mean().item() - 0.5) < 0.01
    torch.testing.assert_close(
        flow.sample_uniform(10, generator=_gen(3)), flow.sample_uniform(10, generator=_gen(3))
    )


def test_sample_logit_normal_range_and_median():
    t = flow.sample_logit_normal(20000, generator=_gen(0))
    assert t.min().item() > 0.0 and t.max().item() < 1.0
    assert abs(t.median().item() - 0.5) < 0.02
    t = flow.sample_logit_normal(20000, mean=1.0, std=0.5, generator=_gen(1))
    assert abs(t.median().item() - 1 / (1 + math.exp(-1.0))) < 0.02
    logit = torch.log(t / (1 - t))
    assert abs(logit.std().item() - 0.5) < 0.02


def test_clamp_sigma():
    s = torch.tensor([0.0, 0.01, 0.5, 0.99, 1.0])
    torch.testing.assert_close(flow.clamp_sigma(s), torch.tensor([0.02, 0.02, 0.5, 0.98, 0.98]))
    torch.testing.assert_close(
        flow.clamp_sigma(s, 0.1, 0.9), torch.tensor([0.1, 0.1, 0.5, 0.9, 0.9])
    )
    assert (flow.SIGMA_MIN, flow.SIGMA_MAX) == (0.02, 0.98)


# ------------------------------------------------------------------------------ seeding
def test_sample_seed_deterministic_and_distinct():
    assert flow.sample_seed(0, "p1", 3) == flow.sample_seed(0, "p1", 3)
    seeds = {flow.sample_seed(r, p, i) for r in (0, 1) for p in ("p0", "p1", 7) for i in range(10)}
    assert len(seeds) == 2 * 3 * 10
    for s in seeds:
        assert 0 <= s < 2**63
    assert flow.sample_seed(0, "a", 0) != flow.sample_seed(0, "b", 0)
    assert flow.sample_seed(0, "a", 0) != flow.sample_seed(0, "a", 1)
    assert flow.sample_seed(0, "a", 0) != flow.sample_seed(1, "a", 0)
    # the separator keeps (1, 23) and (12, 3) apart
    assert flow.sample_seed(0, 1, 23) != flow.sample_seed(0, 12, 3)


def test_seeded_noise_row_independent_of_batch():
    shape = (1, 8, 8)
    seeds = [flow.sample_seed(0, "p", i) for i in range(6)]
    full = flow.seeded_noise(shape, seeds)
    assert full.shape == (6, *shape) and full.dtype == torch.float32
    for i, seed in enumerate(seeds):
        torch.testing.assert_close(flow.seeded_noise(shape, [seed])[0], full[i], atol=0, rtol=0)
    shuffled = flow.seeded_noise(shape, [seeds[4], 12345, seeds[1]])
    torch.testing.assert_close(shuffled[0], full[4], atol=0, rtol=0)
    torch.testing.assert_close(shuffled[2], full[1], atol=0, rtol=0)
    # distinct seeds give distinct noise, and it is standard normal
    assert not torch.equal(full[0], full[1])
    big = flow.seeded_noise((4096,), [1, 2])
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1) < 0.05
    # the same as a fresh generator seeded with the sample's seed
    ref = torch.randn(shape, generator=torch.Generator().manual_seed(seeds[2]))
    torch.testing.assert_close(full[2], ref, atol=0, rtol=0)
