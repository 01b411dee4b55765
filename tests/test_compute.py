"""Compute accounting (run.json "cost"): the core's counts against counts the test makes itself
by wrapping every network call at the backbone, FLOPs against FlopCounterMode, resume."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from cdmbench import compute
from cdmbench.backbones.base import Backbone
from cdmbench.backbones.digits import Digits
from cdmbench.io import sha256_file
from cdmbench.methods.cd import CD, CDConfig
from cdmbench.methods.cdm import CDM, CDMConfig
from cdmbench.methods.dmd2 import DMD2, DMD2Config
from cdmbench.training.core import TrainConfig, Trainer
from cdmbench.training.run import export_student, train_run

KEYS = {
    "flops",
    "train_flops",
    "data",
    "wall_s",
    "images",
    "teacher_nfe",
    "forward",
    "backward",
    "iters",
    "world",
}


class _Tap(torch.autograd.Function):
    """Identity whose backward marks its call record as backpropagated."""

    @staticmethod
    def forward(ctx, x: Tensor, rec: dict) -> Tensor:
        ctx.rec = rec
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.rec["backward"] += 1
        return grad, None


def counting(cls: type[Backbone]) -> type[Backbone]:
    """``cls`` whose every network call (``Backbone.forward``, the one place methods reach a
    network through) is recorded while ``on``: the model called, its rows, its FLOPs (measured
    here on the call) and how often its output was backpropagated. Independent of the core's
    hooks."""

    class Counting(cls):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.calls: dict[int, list[dict]] = defaultdict(list)
            self.on = False

        def forward(self, model: nn.Module, x: Tensor, s: Tensor, cond: dict) -> Tensor:
            if not self.on:
                return super().forward(model, x, s, cond)
            with FlopCounterMode(display=False) as fc:
                out = super().forward(model, x, s, cond)
            rec = {"rows": x.shape[0], "backward": 0, "flops": fc.get_total_flops()}
            self.calls[id(model)].append(rec)
            return _Tap.apply(out, rec) if out.requires_grad else out

        def _hooked(self, block, model, x, s, cond, pick=lambda o: o):
            """A call read at an inner block (DMD2's GAN features): its backward enters
            there, costing twice the forward FLOPs up to the block (measured here on a
            forward of its own, with a hook on the block)."""
            out = super()._hooked(block, model, x, s, cond, pick)
            if not self.on or not out.requires_grad:
                return out
            x, s = x.detach().clone(), s.detach().expand(x.shape[0]).clone()

            def measure() -> int:  # after training, where nothing is counted
                at: list[int] = []
                with FlopCounterMode(display=False) as fc, torch.no_grad():
                    h = block.register_forward_hook(lambda *_: at.append(fc.get_total_flops()))
                    cls.forward(self, model, x, s, cond.tensors)
                    h.remove()
                return at[0]

            rec = {"rows": x.shape[0], "backward": 0, "measure": measure}
            self.inner[id(model)].append(rec)
            return _Tap.apply(out, rec)

    Counting.inner = None
    init = Counting.__init__

    def __init__(self, *a, **kw) -> None:
        init(self, *a, **kw)
        self.inner = defaultdict(list)  # calls read at an inner block, by model

    Counting.__init__ = __init__
    return Counting


CountingDigits = counting(Digits)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**(dict(iters=4, batch=4, seed=0, ckpt_every=10**9, log_every=10**9) | kw))


def _cdm() -> CDM:  # CFG augmentation on: the teacher's calls are CFG calls of 2B rows
    return CDM(
        CDMConfig(student_lr=1e-3, fake_lr=1e-3, warmup=0, n_max=3, update_ratio=2, cfg_aug_scale=2)
    )


def _dmd2() -> DMD2:  # the distillation objective alone (the GAN head's calls are no network's)
    return DMD2(
        DMD2Config(student_lr=1e-3, fake_lr=1e-3, update_ratio=2, real_guidance=3.0, gan=False)
    )


def _cd() -> CD:  # one phase, EMA target, real data: a separate "target" model
    return CD(CDConfig(student_lr=1e-3, warmup=0, edges=(0,), teacher_guidance=2.0, data="real"))


def _expected(bb, tr: Trainer) -> dict:
    """The cost the test's own counts imply, by model name."""
    names = {id(tr.teacher): "teacher"}
    for n, m in tr.models.items():
        names.setdefault(id(m), n)
    assert set(bb.calls) <= set(names), "a network call on a model the core does not hold"
    for rec in (r for c in bb.inner.values() for r in c):
        if "measure" in rec:
            rec["flops"] = rec.pop("measure")()
    fwd = {n: len(bb.calls[i]) for i, n in names.items()}
    bwd = {n: sum(r["backward"] for r in bb.calls[i] + bb.inner[i]) for i, n in names.items()}
    per_model = {
        n: float(
            sum(r["flops"] * (1 + 2 * r["backward"]) for r in bb.calls[i])
            + sum(2 * r["flops"] * r["backward"] for r in bb.inner[i])
        )
        for i, n in names.items()
    }
    nfe = sum(r["rows"] for r in bb.calls[id(tr.teacher)])
    return {
        "forward": fwd,
        "backward": bwd,
        "flops": sum(per_model.values()),
        "flops_per_model": per_model,
        "teacher_nfe": nfe,
    }


@pytest.mark.parametrize(
    ("make", "models"),
    [
        (_cdm, {"teacher", "student", "ema", "fake"}),
        (_dmd2, {"teacher", "student", "ema", "fake"}),
        (_cd, {"teacher", "student", "ema", "target"}),
    ],
    ids=["cdm", "dmd2", "cd"],
)
def test_run_json_cost_equals_the_calls_counted_by_wrapping_the_networks(tmp_path, make, models):
    bb = CountingDigits()
    tr = Trainer(bb, make(), _cfg(grad_accum=2), tmp_path / "run")
    bb.on = True
    tr.train()
    bb.on = False  # the export's sample grid is no training compute
    payload = {"method": tr.method.name, "backbone": "digits", "method_config": {}}
    export_student(tr, tmp_path / "run", payload, 0.0, (1,))
    cost = json.loads((tmp_path / "run" / "run.json").read_text())["cost"]
    assert set(cost) == KEYS and set(cost["forward"]) == set(cost["backward"]) == models
    want = _expected(bb, tr)
    assert cost["forward"] == want["forward"] and cost["backward"] == want["backward"]
    assert cost["teacher_nfe"] == want["teacher_nfe"] > 0
    assert cost["flops"] == pytest.approx(want["flops"], rel=1e-12) and cost["flops"] > 0
    flops = [r["flops"] for c in bb.calls.values() for r in c]
    assert len(set(flops)) > 1 and min(flops) > 0  # B- and 2B-row calls differ
    assert cost["images"] == 4 * 4 * 2  # iters x batch x grad_accum, one process
    assert cost["iters"] == 4 and cost["world"] == 1 and cost["wall_s"] > 0
    assert cost["forward"]["student"] > 0 and cost["backward"]["student"] > 0
    assert cost["backward"]["teacher"] == 0 and cost["forward"]["ema"] == 0
    # a CFG call of B samples is one call of 2B rows; CDM's dm target calls it unguided too
    calls = cost["forward"]["teacher"]
    if make is _cdm:
        assert 4 * calls < cost["teacher_nfe"] < 2 * 4 * calls
    else:
        assert cost["teacher_nfe"] == 2 * 4 * calls


def test_gan_feature_backward_is_counted_up_to_the_middle_block(tmp_path):
    """DMD2's GAN head reads the fake score's middle features: those calls' backwards stop at
    the middle block and cost twice the forward FLOPs up to it."""
    bb = CountingDigits()
    method = DMD2(
        DMD2Config(student_lr=1e-3, fake_lr=1e-3, update_ratio=2, real_guidance=3.0, gan=True)
    )
    tr = Trainer(bb, method, _cfg(), tmp_path / "run")
    bb.on = True
    tr.train()
    bb.on = False
    cost, totals, want = tr.train_cost(), tr.compute.totals(), _expected(bb, tr)
    inner = bb.inner[id(tr.models["fake"])]
    # both GAN updates read features: the fake's classifier loss (real and generated) and
    # the generator's loss (its own samples); each feature backward is counted once
    assert len(inner) > 0 and all(r["backward"] == 1 for r in inner)
    whole = max(r["flops"] for r in bb.calls[id(tr.models["fake"])])
    assert 0 < max(r["flops"] for r in inner) < whole  # half the MLP, not all of it
    networks = ("teacher", "student", "ema", "fake")
    assert {m: cost["forward"][m] for m in networks} == {m: want["forward"][m] for m in networks}
    assert {m: cost["backward"][m] for m in networks} == {m: want["backward"][m] for m in networks}
    for m in networks:
        assert totals["flops"][m] == pytest.approx(want["flops_per_model"][m], rel=1e-12), m
    assert cost["forward"]["gan_head"] > 0 and cost["backward"]["gan_head"] > 0


def test_teacher_data_made_before_training_is_in_the_cost(tmp_path):
    """DMD's regression pairs: n samples x steps teacher calls (CFG: 2 rows each), the same
    cost whether the set was generated or read from the cache."""
    from cdmbench.methods.dmd import DMD, DMDConfig

    def run(name: str) -> dict:
        bb = CountingDigits()
        cfg = DMDConfig(student_lr=1e-3, fake_lr=1e-3, reg_pairs=24, real_guidance=2.0)
        tr = Trainer(bb, DMD(cfg), _cfg(iters=2), tmp_path / "runs" / name)
        bb.on = True
        tr.train()
        return tr.train_cost() | {"_want": _expected(bb, tr)}

    first, second = run("a"), run("b")  # the second reads the first's cached set
    data = first["data"]["teacher_samples"]
    steps = Digits().default_teacher_steps
    assert data["samples"] == 24 and data["teacher_nfe"] == 24 * steps * 2
    bb = Digits()
    teacher = bb.load_teacher()
    x, s = torch.randn(1, *bb.latent_shape), torch.ones(1)
    cond = bb.encode(bb.prompts("train")[:1])
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        bb.velocity(teacher, x, s, cond, 2.0)
    assert data["flops"] == pytest.approx(24 * steps * fc.get_total_flops(), rel=1e-12)
    assert second["data"] == first["data"]
    for c in (first, second):
        want = c["_want"]
        assert c["train_flops"] == pytest.approx(want["flops"], rel=1e-12)
        assert c["flops"] == pytest.approx(want["flops"] + data["flops"], rel=1e-12)
        assert c["teacher_nfe"] == want["teacher_nfe"] + data["teacher_nfe"]


def test_cost_of_a_resumed_run_is_the_uninterrupted_runs(tmp_path):
    whole = Trainer(Digits(), _cdm(), _cfg(iters=6), tmp_path / "whole")
    whole.train()
    first = Trainer(Digits(), _cdm(), _cfg(iters=3), tmp_path / "first")
    first.train()
    resumed = Trainer(Digits(), _cdm(), _cfg(iters=6), tmp_path / "resumed")
    resumed.load_checkpoint(tmp_path / "first" / "checkpoint")
    resumed.train()
    a, b = whole.train_cost(), resumed.train_cost()
    assert a["forward"]["teacher"] > 0
    for k in ("forward", "backward", "teacher_nfe", "images", "iters", "world"):
        assert a[k] == b[k], k
    assert a["flops"] == pytest.approx(b["flops"], rel=1e-12)
    assert b["wall_s"] > first.train_cost()["wall_s"] > 0  # both sessions' time


def test_a_checkpoint_without_cost_resumes_and_counts_from_zero(tmp_path):
    first = Trainer(Digits(), _cdm(), _cfg(iters=3), tmp_path / "first")
    first.train()
    ckpt = tmp_path / "first" / "checkpoint"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    state = ckpt / manifest["files"]["state"]
    other = torch.load(state, weights_only=True)
    other.pop("cost")  # as checkpoints written before accounting
    torch.save(other, state)
    manifest["sha256"][state.name] = sha256_file(state)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    resumed = Trainer(Digits(), _cdm(), _cfg(iters=5), tmp_path / "resumed")
    resumed.load_checkpoint(ckpt)
    resumed.train()
    cost = resumed.train_cost()
    assert resumed.it == 5 and cost["images"] == 2 * 4  # the two iterations of this session


def test_counting_changes_no_result(tmp_path):
    def state(tr: Trainer) -> dict[str, Tensor]:
        return {f"{n}.{k}": v for n, m in tr.models.items() for k, v in m.state_dict().items()}

    counted = Trainer(Digits(), _dmd2(), _cfg(), tmp_path / "a")
    counted.train()
    plain = Trainer(Digits(), _dmd2(), _cfg(), tmp_path / "b")
    plain.compute.remove()
    plain.train()
    a, b = state(counted), state(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert counted.train_cost()["forward"]["student"] > 0
    assert plain.train_cost()["forward"]["student"] == 0


def test_train_run_writes_the_cost_in_run_json(tmp_path):
    bb = CountingDigits()
    bb.on = True

    def progress(it: int, logs: dict) -> None:
        bb.on = it < 2  # the export's sample grid is no training compute

    run = train_run(_cd(), bb, _cfg(iters=2, log_every=1), tmp_path, progress=progress)
    cost = json.loads((Path(run.run_dir) / "run.json").read_text())["cost"]
    assert set(cost) == KEYS
    assert sum(cost["forward"].values()) == sum(len(c) for c in bb.calls.values()) > 0
    assert cost["images"] == 2 * 4 and cost["iters"] == 2


def test_format_cost_and_human_units():
    assert compute.human_flops(1.234e15) == "1.2 PFLOP"
    assert compute.human_flops(3.5e11) == "350 GFLOP" and compute.human_flops(12) == "12 FLOP"
    assert compute.human_flops(0) == compute.human_flops(None) == "-"
    assert compute.human_seconds(42) == "42 s" and compute.human_seconds(5400) == "1.5 h"
    line = compute.format_cost(
        {
            "flops": 2e12,
            "wall_s": 90,
            "images": 1000,
            "teacher_nfe": 4000,
            "forward": {"teacher": 10, "student": 20, "ema": 0},
            "backward": {"teacher": 0, "student": 10, "ema": 0},
        }
    )
    assert line.startswith("2 TFLOP, 4,000 teacher NFE, 1,000 images, 1.5 min")
    assert "student 20/10" in line and "ema" not in line
    assert compute.format_cost({}) == "-"


def test_tiny_sd3_cost_equals_the_wrapped_counts(tmp_path):
    from dataclasses import replace

    from cdmbench.backbones.sd3 import TinySD3

    bb = counting(TinySD3)()
    method = CDM(replace(CDM.default_config("tiny-sd3"), n_max=2))
    tr = Trainer(bb, method, _cfg(iters=2, batch=2), tmp_path / "run")
    bb.on = True
    tr.train()
    cost, want = tr.train_cost(), _expected(bb, tr)
    assert cost["forward"] == want["forward"] and cost["backward"] == want["backward"]
    assert cost["teacher_nfe"] == want["teacher_nfe"] > 0
    assert cost["flops"] == pytest.approx(want["flops"], rel=1e-12) and cost["flops"] > 0


def test_two_processes_sum_their_counts(tmp_path):
    import shutil

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    from test_distributed import cdmbench

    # checkpoints every iteration: the sharded (DCP) save sums the counts of both ranks too
    train = ["train", "cd", "--iters", "2", "--batch", "2", "--set", "train.ckpt_every=1"]
    cdmbench([*train, "--out", "runs"], 2, tmp_path)
    run = next((tmp_path / "runs" / "digits").glob("cd-*"))
    two = json.loads((run / "run.json").read_text())["cost"]
    tr = Trainer(Digits(), CD(CD.default_config("digits")), _cfg(iters=2, batch=2), tmp_path / "1")
    tr.train()
    one = tr.train_cost()
    assert one["world"] == 1 and two["world"] == 2 and two["iters"] == one["iters"] == 2
    assert one["forward"]["teacher"] > 0
    for k in ("images", "teacher_nfe"):
        assert two[k] == 2 * one[k], k
    for k in ("forward", "backward"):
        assert two[k] == {m: 2 * n for m, n in one[k].items()}, k
    assert two["flops"] == pytest.approx(2 * one["flops"], rel=1e-12)
