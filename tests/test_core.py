"""The training core (DESIGN.md section 5): EMA, merges, normaliser, warm-up, clipping,
update cadence, checkpoint/resume and the non-finite guard, on the 2-D toy backbone."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from toy import Toy

from cdmbench.losses import dm_normalizer
from cdmbench.methods.cd import CD, CDConfig
from cdmbench.methods.cdm import CDM, CDMConfig
from cdmbench.methods.dmd import DMD, DMDConfig
from cdmbench.methods.dmd2 import DMD2, DMD2Config
from cdmbench.training.core import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    ema_decay,
    ema_update_,
    merge_,
)
from cdmbench.training.method import Batch, Core, Method, OptimSpec


def _dir(path):
    path.mkdir(parents=True, exist_ok=True)  # Trainer.train() does not create its run_dir
    return path


def _cfg(**kw) -> TrainConfig:
    base = dict(iters=10, batch=16, seed=0, ckpt_every=10**9, log_every=10**9)
    return TrainConfig(**(base | kw))


def _methods() -> dict:
    """Small configurations of every built-in method (warm-up short, lr large)."""
    return {
        "cdm": lambda: CDM(CDMConfig(student_lr=1e-3, fake_lr=1e-3, warmup=3, n_max=3)),
        "dmd": lambda: DMD(
            DMDConfig(student_lr=1e-3, fake_lr=1e-3, warmup=3, reg_pairs=32, real_guidance=2.0)
        ),
        "dmd2": lambda: DMD2(
            DMD2Config(student_lr=1e-3, fake_lr=1e-3, warmup=3, real_guidance=2.0, gan=False)
        ),
        "cd": lambda: CD(CDConfig(student_lr=1e-3, warmup=3, grid=10, edges=(0, 5))),
    }


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------- EMA and merges
def test_ema_decay_warm_start_and_cap():
    for k in (0, 1, 2, 10, 90, 1000, 8989):
        assert ema_decay(k) == pytest.approx((1 + k) / (10 + k), rel=1e-12)
    assert ema_decay(0) == pytest.approx(0.1)
    assert ema_decay(90) == pytest.approx(0.91)
    # (1 + k) / (10 + k) reaches 0.999 at k = 8990; from there on the cap holds.
    assert ema_decay(8991) == 0.999
    assert ema_decay(10**7) == 0.999
    assert ema_decay(5, cap=0.3) == 0.3  # 6/15 = 0.4 is capped
    assert ema_decay(1, cap=0.3) == pytest.approx(2 / 11)
    values = [ema_decay(k) for k in range(0, 20000, 97)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))


def _pair_of_modules(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), nn.Sequential(
        nn.Linear(3, 4), nn.Linear(4, 2)
    )


@pytest.mark.parametrize("decay", [0.0, 0.1, 0.9, 0.999, 1.0])
def test_ema_update_formula(decay):
    target, source = _pair_of_modules()
    t0, s0 = _params(target), _params(source)
    ema_update_(target, source, decay)
    for p, a, b in zip(target.parameters(), t0, s0, strict=True):
        torch.testing.assert_close(p.detach(), decay * a + (1 - decay) * b, rtol=1e-6, atol=1e-7)
        assert p.grad_fn is None and p.grad is None
    assert _same(_params(source), s0)  # the source is untouched


def test_merge_moves_fake_by_alpha_toward_student():
    fake, student = _pair_of_modules(1)
    f0, s0 = _params(fake), _params(student)
    merge_(fake, student, 0.001)
    for p, f, s in zip(fake.parameters(), f0, s0, strict=True):
        torch.testing.assert_close(p.detach(), 0.999 * f + 0.001 * s, rtol=1e-6, atol=1e-7)
    merge_(fake, student, 1.0)  # alpha = 1 copies the student
    assert _same(_params(fake), s0)
    assert _same(_params(student), s0)


# ----------------------------------------------------------------------------- normaliser
def test_dm_normalizer_per_sample_value_and_floor():
    ref = torch.zeros(3, 2, 2)
    x0 = torch.stack(
        [
            torch.full((2, 2), 0.5),
            torch.tensor([[1.0, -1.0], [0.0, 2.0]]),
            torch.full((2, 2), -0.02),
        ]
    )
    n = dm_normalizer(ref, x0)
    assert n.shape == (3, 1, 1)  # broadcastable to x0
    torch.testing.assert_close(n.flatten(), torch.tensor([0.5, 1.0, 0.02]))
    floored = dm_normalizer(ref, x0, floor=0.1)
    torch.testing.assert_close(floored.flatten(), torch.tensor([0.5, 1.0, 0.1]))
    # symmetric in its arguments, and zero without a floor when they agree
    torch.testing.assert_close(dm_normalizer(x0, ref, 0.1), floored)
    assert float(dm_normalizer(x0, x0).abs().max()) == 0.0
    assert torch.all(dm_normalizer(x0, x0, 0.1) == 0.1)


# --------------------------------------------------------------------- warm-up, clipping
@dataclass
class ProbeConfig:
    lr: float = 1e-2
    clip: float | None = 0.5
    warmup: int = 0
    scale: float = 100.0


class Probe(Method):
    """A one-group method with a large loss, to observe the core's lr and clipping."""

    name = "probe"
    Config = ProbeConfig

    def optim_groups(self, core: Core) -> dict[str, OptimSpec]:
        c = self.config
        return {
            "student": OptimSpec("student", lr=c.lr, clip=c.clip, warmup=c.warmup, weight_decay=0.0)
        }

    def groups_to_update(self, it: int) -> list[str]:
        return ["student"]

    def losses(
        self, group: str, it: int, batch: Batch, state: None, core: Core
    ) -> dict[str, torch.Tensor]:
        ones = torch.ones(len(batch))
        x0 = core.backbone.x0(core.student, batch.noise, ones, batch.cond)
        return {"mse": self.config.scale * (x0 - 5.0).pow(2).mean()}


def _record_steps(trainer: Trainer) -> dict[str, list]:
    """lr and grad norm that each optimizer sees at the moment it steps."""
    seen: dict[str, list] = {g: [] for g in trainer.optims}

    def hook(group):
        def fn(opt, args, kwargs):
            grads = [p.grad for pg in opt.param_groups for p in pg["params"] if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            seen[group].append((opt.param_groups[0]["lr"], norm))

        return fn

    for g, opt in trainer.optims.items():
        opt.register_step_pre_hook(hook(g))
    return seen


@pytest.mark.parametrize("clip", [0.5, None])
def test_trainer_clips_gradients_to_the_group_max_norm(tmp_path, clip):
    tr = Trainer(Toy(), Probe(ProbeConfig(clip=clip)), _cfg(), tmp_path)
    seen = _record_steps(tr)
    logged = [float(tr.step(tr.next_batch())["student/grad_norm"]) for _ in range(3)]
    at_step = [n for _, n in seen["student"]]
    assert min(logged) > 2.0  # the loss is large: the raw norm exceeds the clip
    if clip is None:
        assert at_step == pytest.approx(logged, rel=1e-5)
    else:
        assert at_step == pytest.approx([clip] * 3, rel=1e-4)  # logs keep the pre-clip norm


def test_trainer_linear_warmup_per_group_counter(tmp_path):
    method = CDM(CDMConfig(student_lr=1e-3, fake_lr=2e-3, warmup=4, n_max=2))
    tr = Trainer(Toy(), method, _cfg(), tmp_path)
    seen = _record_steps(tr)
    for _ in range(10):
        tr.step(tr.next_batch())
    fake_lr = [lr for lr, _ in seen["fake"]]
    student_lr = [lr for lr, _ in seen["student"]]
    assert fake_lr == pytest.approx([2e-3 * min(1.0, (k + 1) / 4) for k in range(10)])
    # the student group counts its own updates (one every update_ratio = 2 iterations)
    assert student_lr == pytest.approx([1e-3 * min(1.0, (k + 1) / 4) for k in range(5)])
    assert tr.updates == {"fake": 10, "student": 5}
    assert tr.it == 10


def test_trainer_without_warmup_uses_the_full_rate(tmp_path):
    tr = Trainer(Toy(), Probe(ProbeConfig(warmup=0, lr=3e-3)), _cfg(), tmp_path)
    seen = _record_steps(tr)
    for _ in range(2):
        tr.step(tr.next_batch())
    assert [lr for lr, _ in seen["student"]] == [3e-3, 3e-3]


def test_trainer_updates_student_ema_with_warm_started_decay(tmp_path):
    tr = Trainer(Toy(), Probe(ProbeConfig(lr=1e-2, clip=None)), _cfg(), tmp_path)
    ema = _params(tr.student)
    for k in range(4):
        tr.step(tr.next_batch())
        d = ema_decay(k)
        ema = [d * e + (1 - d) * s for e, s in zip(ema, _params(tr.student), strict=True)]
    for p, e in zip(tr.ema.parameters(), ema, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in tr.ema.parameters())


# ----------------------------------------------------------------------- method interface
def test_trainer_provides_the_core_interface(tmp_path):
    tr = Trainer(Toy(), Probe(), _cfg(), tmp_path)
    assert isinstance(tr, Core)  # every attribute and helper the protocol names
    assert tr.models["student"] is tr.student and tr.models["ema"] is tr.ema
    batch = tr.next_batch()
    assert isinstance(batch, Batch) and len(batch) == 16


class Recorder(Probe):
    """Two groups on a cadence; logs the core's calls and the state each group is given."""

    name = "recorder"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.calls: list[tuple] = []

    def build(self, core: Core) -> dict[str, nn.Module]:
        return {"fake": core.backbone.clone(core.student).requires_grad_(True).train()}

    def optim_groups(self, core: Core) -> dict[str, OptimSpec]:
        return {"fake": OptimSpec("fake", warmup=0), "student": OptimSpec("student", warmup=0)}

    def groups_to_update(self, it: int) -> list[str]:
        return ["fake", "student"] if it % 2 == 0 else ["fake"]

    def prepare(self, it: int, batch: Batch, core: Core) -> tuple[str, int]:
        self.calls.append(("prepare", it))
        return ("state", it)

    def losses(self, group, it, batch, state, core):
        self.calls.append((group, it, state))
        ones = torch.ones(len(batch))
        x0 = core.backbone.x0(core.models[group], batch.noise, ones, batch.cond)
        return {"mse": (x0 - 5.0).pow(2).mean()}


def test_prepare_runs_once_per_iteration_and_its_state_reaches_every_group(tmp_path):
    method = Recorder()
    tr = Trainer(Toy(), method, _cfg(), tmp_path)
    for _ in range(3):
        tr.step(tr.next_batch())
    assert method.calls == [
        ("prepare", 0),
        ("fake", 0, ("state", 0)),
        ("student", 0, ("state", 0)),
        ("prepare", 1),
        ("fake", 1, ("state", 1)),
        ("prepare", 2),
        ("fake", 2, ("state", 2)),
        ("student", 2, ("state", 2)),
    ]
    assert tr.updates == {"fake": 3, "student": 2}


# ------------------------------------------------------------------------------- cadence
def test_update_cadence_of_each_method():
    cdm, dmd2 = CDM(), DMD2()
    for it in range(20):
        assert cdm.groups_to_update(it) == (["fake", "student"] if it % 2 == 0 else ["fake"])
        assert dmd2.groups_to_update(it) == (["student", "fake"] if it % 5 == 0 else ["fake"])
        assert DMD().groups_to_update(it) == ["student", "fake"]
        assert CD().groups_to_update(it) == ["student"]
    assert CDM(CDMConfig(update_ratio=5)).groups_to_update(5) == ["fake", "student"]
    assert CDM(CDMConfig(update_ratio=5)).groups_to_update(4) == ["fake"]
    assert CDM.Config().update_ratio == 2 and DMD2.Config().update_ratio == 5


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cdm", {"fake": 11, "student": 6}),
        ("dmd", {"student": 11, "fake": 11}),
        ("dmd2", {"fake": 11, "student": 3}),
        ("cd", {"student": 11}),
    ],
)
def test_trainer_follows_the_cadence(tmp_path, name, expected):
    tr = Trainer(Toy(), _methods()[name](), _cfg(iters=11), tmp_path)
    tr.train()
    assert tr.it == 11 and tr.updates == expected
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["it"] == 11 and all(f"{g}/grad_norm" in log[-1] for g in expected)


# ----------------------------------------------------------------------------- checkpoints
def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in tr.models.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", ["cdm", "dmd", "dmd2", "cd"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, name):
    make = _methods()[name]
    whole = Trainer(Toy(), make(), _cfg(iters=7), _dir(tmp_path / "whole"))
    whole.train()

    first = Trainer(Toy(), make(), _cfg(iters=3), _dir(tmp_path / "first"))
    first.train()  # writes its checkpoint at iteration 3
    resumed = Trainer(Toy(), make(), _cfg(iters=7), _dir(tmp_path / "resumed"))
    resumed.load_checkpoint(tmp_path / "first" / "checkpoint")
    assert resumed.it == 3 and resumed.updates == first.updates
    resumed.train()

    assert resumed.it == whole.it == 7 and resumed.updates == whole.updates
    a, b = _state(whole), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for g in whole.optims:
        sa, sb = whole.optims[g].state_dict()["state"], resumed.optims[g].state_dict()["state"]
        for i in sa:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sa[i][key], sb[i][key])
    assert torch.equal(whole.g.get_state(), resumed.g.get_state())
    assert torch.equal(whole.g_shared.get_state(), resumed.g_shared.get_state())


def _saved(tmp_path, make=None, backbone=None, iters: int = 2):
    tr = Trainer(backbone or Toy(), (make or _methods()["cd"])(), _cfg(iters=iters), _dir(tmp_path))
    tr.train()
    return tmp_path / "checkpoint"


@pytest.mark.parametrize("victim", ["models", "state"])
def test_corrupted_checkpoint_file_raises(tmp_path, victim):
    ckpt = _saved(tmp_path / "run")
    path = Trainer.checkpoint_files(ckpt)[victim]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = Trainer(Toy(), _methods()["cd"](), _cfg(), tmp_path / "other")
    before = _state(fresh)
    with pytest.raises(CheckpointError, match="corrupt"):
        fresh.load_checkpoint(ckpt)
    assert fresh.it == 0 and all(torch.equal(v, _state(fresh)[k]) for k, v in before.items())


@pytest.mark.parametrize("damage", ["truncate-manifest", "delete-state"])
def test_damaged_manifest_or_missing_file_raises_checkpoint_error(tmp_path, damage):
    ckpt = _saved(tmp_path / "run")
    if damage == "truncate-manifest":
        text = (ckpt / "manifest.json").read_text()
        (ckpt / "manifest.json").write_text(text[: len(text) // 2])
    else:
        Trainer.checkpoint_files(ckpt)["state"].unlink()
    fresh = Trainer(Toy(), _methods()["cd"](), _cfg(), tmp_path / "other")
    with pytest.raises(CheckpointError):
        fresh.load_checkpoint(ckpt)


def test_checkpoint_of_another_method_raises(tmp_path):
    ckpt = _saved(tmp_path / "run", make=_methods()["cd"])
    other = Trainer(Toy(), _methods()["cdm"](), _cfg(), tmp_path / "other")
    with pytest.raises(CheckpointError, match="method 'cd'"):
        other.load_checkpoint(ckpt)
    assert other.it == 0


def test_checkpoint_of_another_backbone_raises(tmp_path):
    ckpt = _saved(tmp_path / "run", backbone=Toy(name="toy-a"))
    other = Trainer(Toy(name="toy-b"), _methods()["cd"](), _cfg(), tmp_path / "other")
    with pytest.raises(CheckpointError, match="toy-a"):
        other.load_checkpoint(ckpt)


# ------------------------------------------------------------------------ non-finite guard
class NaNAt(CD):
    """Consistency distillation whose loss gains a NaN term ("boom") at one iteration."""

    bad_it = 1

    def losses(self, group, it, batch, state, core):
        terms = super().losses(group, it, batch, state, core)
        if it == self.bad_it:
            terms["boom"] = terms["huber"] * float("nan")
        return terms


def _nan_trainer(tmp_path, on_nan: str) -> Trainer:
    return Trainer(
        Toy(),
        NaNAt(CDConfig(student_lr=1e-3, warmup=1, grid=10, edges=(0,))),
        _cfg(iters=4, on_nan=on_nan),
        tmp_path,
    )


def test_non_finite_loss_stops_naming_term_and_iteration(tmp_path):
    tr = _nan_trainer(tmp_path, "stop")
    tr.step(tr.next_batch())
    before, ema_before = _params(tr.student), _params(tr.ema)
    with pytest.raises(NonFiniteLossError, match=r"student loss at iteration 1 .*boom=nan"):
        tr.step(tr.next_batch())
    assert _same(_params(tr.student), before) and _same(_params(tr.ema), ema_before)
    assert tr.updates == {"student": 1}
    assert all(p.grad is None for p in tr.student.parameters())


def test_non_finite_loss_is_skipped_and_counted(tmp_path):
    tr = _nan_trainer(tmp_path, "skip")
    tr.step(tr.next_batch())
    before, target_before = _params(tr.student), _params(tr.models["target"])
    logs = tr.step(tr.next_batch())  # iteration 1: skipped
    assert tr.nan_skipped == 1 and tr.updates == {"student": 1} and tr.it == 2
    assert "student/boom" not in logs
    assert _same(_params(tr.student), before) and _same(_params(tr.models["target"]), target_before)
    tr.train()  # iterations 2, 3 run normally
    assert tr.nan_skipped == 1 and tr.updates == {"student": 3} and tr.it == 4
    assert not _same(_params(tr.student), before)
    assert all(torch.isfinite(p).all() for p in tr.student.parameters())


def test_checkpoint_killed_before_its_manifest_leaves_the_previous_one_intact(
    tmp_path, monkeypatch
):
    import cdmbench.training.checkpoint as core_mod

    tr = Trainer(Toy(), _methods()["cd"](), _cfg(iters=4), _dir(tmp_path / "run"))
    for _ in range(2):
        tr.step(tr.next_batch())
    ckpt = tr.save_checkpoint()
    kept = {k: p.read_bytes() for k, p in Trainer.checkpoint_files(ckpt).items()}
    tr.step(tr.next_batch())

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies after the data files, before the manifest

    monkeypatch.setattr(core_mod, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint()
    monkeypatch.undo()
    files = Trainer.checkpoint_files(ckpt)
    assert {k: p.read_bytes() for k, p in files.items()} == kept
    fresh = Trainer(Toy(), _methods()["cd"](), _cfg(iters=4), tmp_path / "other")
    fresh.load_checkpoint(ckpt)
    assert fresh.it == 2
    tr.save_checkpoint()  # the next good save removes the orphaned files
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["manifest.json", *[p.name for p in Trainer.checkpoint_files(ckpt).values()]]
    )
