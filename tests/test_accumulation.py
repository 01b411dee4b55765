"""Gradient accumulation (``train.grad_accum``): k micro-batches of b samples make the same
update as one batch of k x b, for every method, on `digits`.

Both runs must consume the same randomness for the comparison to mean anything. The
harness gives every sample position of the effective batch its own generator: a method's
``core.randn(n, ...)`` / ``rand(n)`` / ``randint(high, n)`` takes row i from the generator of
position ``micro_batch * n + i``, so sample i draws the same numbers whether it sits in one
batch of k b or in micro-batch i // b. Each iteration's conditions and noise are drawn once
for k b samples and fed whole to one run and in k slices to the other. The generators the
core owns (``g`` for DMD's regression pairs, whose indices concatenate; ``g_shared`` for
schedule lengths) are the trainer's own.

The harness steps with SGD instead of AdamW: Adam divides each gradient element by its own
magnitude, so an element whose gradient is at float32 noise level moves by up to the learning
rate with either sign; SGD's update is linear in the gradient, so equal gradients give weights
equal to float32 tolerance, and a wrongly scaled gradient (say k times too large) shows.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cdmbench.backbones import get_backbone
from cdmbench.errors import UserError
from cdmbench.registry import METHODS
from cdmbench.training.core import TrainConfig, Trainer
from cdmbench.training.method import Batch

B, K, ITERS = 4, 3, 4


class PerSample(Trainer):
    """A trainer whose per-sample draws come from one generator per batch position."""

    def __init__(self, *args, positions: int, **kw) -> None:
        self.slots = [torch.Generator().manual_seed(10_000 + i) for i in range(positions)]
        super().__init__(*args, **kw)
        self.optims = {g: torch.optim.SGD(self._params[g], lr=0.0) for g in self.specs}

    def _gens(self, n: int) -> list[torch.Generator]:
        return self.slots[self.micro_batch * n : (self.micro_batch + 1) * n]

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self._gens(shape[0])])

    def rand(self, n: int) -> torch.Tensor:
        return torch.cat([torch.rand(1, generator=g) for g in self._gens(n)])

    def randint(self, high: int, n: int) -> torch.Tensor:
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self._gens(n)])


def _method(name: str):
    cls = METHODS.get(name)
    over = {"student_lr": 0.1, "warmup": 0}  # SGD steps of norm <= lr (gradients clipped to 1)
    if name != "cd":
        over["fake_lr"] = 0.1
    if name == "dmd":
        over["reg_pairs"] = 16
    if name in ("cdm", "dmd2"):
        over["update_ratio"] = 2  # student steps at iterations 0 and 2, fake-only at 1 and 3
    return cls(replace(cls.default_config("digits"), **over))


@torch.no_grad()
def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def _run(name: str, tmp_path, batch: int, accum: int) -> tuple[Trainer, list[dict]]:
    bb = get_backbone("digits")
    cfg = TrainConfig(iters=ITERS, batch=batch, grad_accum=accum, seed=0)
    trainer = PerSample(bb, _method(name), cfg, tmp_path / "run", positions=B * K)
    data = torch.Generator().manual_seed(1)
    logs = []
    for _ in range(ITERS):
        cond = bb.random_cond(B * K, data)
        noise = torch.randn(B * K, *bb.latent_shape, generator=data)
        rows = [slice(j * batch, (j + 1) * batch) for j in range(accum)]
        logs.append(trainer.step([Batch(cond.select(r), noise[r]) for r in rows]))
    return trainer, logs


@pytest.mark.parametrize("name", ["cdm", "dmd", "dmd2", "cd"])
def test_accumulated_update_equals_big_batch(name, tmp_path):
    big, big_logs = _run(name, tmp_path / "big", B * K, 1)
    acc, acc_logs = _run(name, tmp_path / "acc", B, K)
    assert acc.updates == big.updates and acc.updates["student"] >= 2
    for it, (a, b) in enumerate(zip(acc_logs, big_logs, strict=True)):
        assert a.keys() == b.keys(), it
        for key in a:  # loss terms (means over the effective batch) and gradient norms
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), (it, key)
    # CD's pseudo-Huber loss has gradient r / sqrt(r^2 + c^2) with c = 1e-3: residuals near c
    # turn float32 rounding of r into a relative gradient error ~1e-4 at a few elements
    atol = 1e-5 if name == "cd" else 1e-6
    for model in big.models:
        for p, q in zip(
            acc.models[model].parameters(), big.models[model].parameters(), strict=True
        ):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=atol)
    teacher = get_backbone("digits").load_teacher()
    moved = _max_diff(big.student, teacher)
    assert moved > 100 * atol  # the weights compared did change


def test_micro_batches_without_shared_draws_differ(tmp_path):
    """Negative control: were the micro-batches of one iteration to draw their own schedule
    (``g_shared`` not shared), CDM's update would not be the big batch's."""
    big, _ = _run("cdm", tmp_path / "big", B * K, 1)

    class OwnSchedules(PerSample):
        def _micro(self, j, fn, *args):
            self.micro_batch = j
            return fn(*args)

    bb = get_backbone("digits")
    cfg = TrainConfig(iters=ITERS, batch=B, grad_accum=K, seed=0)
    acc = OwnSchedules(bb, _method("cdm"), cfg, tmp_path / "own" / "run", positions=B * K)
    data = torch.Generator().manual_seed(1)
    for _ in range(ITERS):
        cond = bb.random_cond(B * K, data)
        noise = torch.randn(B * K, *bb.latent_shape, generator=data)
        acc.step(
            [
                Batch(cond.select(slice(j * B, (j + 1) * B)), noise[j * B : (j + 1) * B])
                for j in range(K)
            ]
        )
    assert _max_diff(acc.student, big.student) > 1e-4


def test_train_loop_draws_every_micro_batch(tmp_path):
    """``train()`` passes one micro-batch; the core draws the rest, and logs stay finite."""
    bb = get_backbone("digits")
    cfg = TrainConfig(iters=2, batch=4, grad_accum=2, seed=0, log_every=1, ckpt_every=10**9)
    trainer = Trainer(bb, _method("cdm"), cfg, tmp_path / "run")
    before = trainer.g.get_state()
    trainer.train()
    assert trainer.it == 2 and trainer.updates == {"fake": 2, "student": 1}
    one = Trainer(bb, _method("cdm"), replace(cfg, grad_accum=1), tmp_path / "one")
    assert torch.equal(one.g.get_state(), before)
    one.train()
    assert not torch.equal(one.g.get_state(), trainer.g.get_state())  # twice the batches drawn


def test_grad_accum_is_checked():
    with pytest.raises(UserError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    assert math.isfinite(TrainConfig(grad_accum=4).grad_accum)
