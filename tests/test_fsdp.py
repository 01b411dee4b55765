"""FSDP2 sharding in the training core.

One torchrun launch of two CPU processes (gloo) runs this file as a worker: for cdm and
dmd2 it trains the same configuration replicated and sharded (``train.shard`` "none" and
"auto" under accelerate's FSDP2 variables), and chains checkpoints sharded -> replicated ->
sharded. The test then compares what the runs wrote: sharding must not change the update
(gradients averaged over ranks, not summed or left local), checkpoints must hold the same
full tensors either way, and a resume through them must be bitwise exact.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdmbench.errors import UserError
from cdmbench.training.core import TrainConfig
from cdmbench.training.sharding import resolve_shard

ITERS = 4
# several forwards per backward, two groups, a merge (cdm); DMD2's GAN head, whose loss reads
# the fake score's middle block
METHODS = ("cdm", "dmd2", "dmd2-gan")
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


# ------------------------------------------------------------------------ configuration
def test_bad_shard_value_is_a_one_line_user_error():
    with pytest.raises(UserError, match="'bogus' for 'train.shard': use none, fsdp2 or auto"):
        TrainConfig(shard="bogus")
    from cdmbench.config import resolve
    from cdmbench.methods.cdm import CDM

    with pytest.raises(UserError, match="train.shard"):
        resolve(CDM, "digits", sets=["train.shard=bogus"])
    assert resolve(CDM, "digits", sets=["train.shard=fsdp2"])[0].shard == "fsdp2"


def test_auto_follows_accelerates_fsdp_variables():
    assert resolve_shard("auto", 2, FSDP_ENV) is True
    assert resolve_shard("auto", 2, {**FSDP_ENV, "ACCELERATE_USE_FSDP": "True"}) is True
    assert resolve_shard("auto", 2, {}) is False  # plain torchrun / accelerate without FSDP
    assert resolve_shard("auto", 2, {"ACCELERATE_USE_FSDP": "false", "FSDP_VERSION": "2"}) is False
    assert resolve_shard("none", 2, FSDP_ENV) is False
    assert resolve_shard("fsdp2", 2, {}) is True
    assert resolve_shard("auto", 1, FSDP_ENV) is False  # one process: nothing to shard across
    for env in (
        {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
        {"ACCELERATE_USE_FSDP": "true"},
    ):
        with pytest.raises(UserError, match="FSDP version 1.*--fsdp_version 2"):
            resolve_shard("auto", 2, env)


def test_fsdp2_in_one_process_warns_and_trains_unsharded(tmp_path):
    from cdmbench.training.core import Trainer

    with pytest.warns(UserWarning, match="single process"):
        tr = Trainer(
            _backbone(), _method("dmd2"), TrainConfig(iters=2, batch=8, shard="fsdp2"), tmp_path
        )
    assert not tr.sharded and not tr.sharded_models
    tr.train()
    assert tr.it == 2 and not any(type(p).__name__ == "DTensor" for p in tr.student.parameters())


# ------------------------------------------------------------------- two processes
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _checkpoint(run_dir: Path) -> tuple[dict, dict, dict]:
    """(manifest, full model tensors, other state) of a run directory's (sharded) checkpoint."""
    from cdmbench.training import checkpoint

    return checkpoint.read(run_dir / "checkpoint")


def _grad_norms(run_dir: Path) -> dict[str, list[float]]:
    recs = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return {k: [r[k] for r in recs] for k in recs[-1] if k.endswith("grad_norm")}


def _assert_same_update(a: dict, b: dict, init: dict | None, what: str) -> None:
    """b moved from init as a did, up to rounding: the difference is within 1e-4 of how far
    a moved (norms), and 1e-4 at most per weight (a tenth of one step at lr 1e-3).

    Not bitwise: a sharded forward reads its weights from the all-gather buffer, whose
    alignment can change the CPU matmul's rounding (gradients differ by ~1e-7 relative at
    the first step), and Adam's normalised update amplifies that where a moment nearly
    cancels (measured after six iterations of cdm: 2.4e-5 at most, 2.4e-5 relative).
    """
    assert a.keys() == b.keys(), what
    diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in a])
    if init is None:  # a model that does not start from the teacher (the GAN head)
        assert diff.abs().max() <= 1e-4, f"{what}: max diff {diff.abs().max():.2e}"
        return
    moved = torch.cat([(a[k].float() - init[k].float()).flatten() for k in a])
    assert moved.norm() > 1e-2, f"{what}: training barely moved the weights ({moved.norm():.2e})"
    assert diff.abs().max() <= 1e-4 and diff.norm() <= 1e-4 * moved.norm(), (
        f"{what}: max diff {diff.abs().max():.2e}, relative {diff.norm() / moved.norm():.2e}"
    )


def _assert_equal_optims(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for g in a:
        assert a[g]["param_groups"] == b[g]["param_groups"], (what, g)
        sa, sb = a[g]["state"], b[g]["state"]
        assert sa.keys() == sb.keys() and sa, (what, g)
        for i in sa:
            for k in sa[i]:
                assert torch.equal(sa[i][k], sb[i][k]), (what, g, i, k)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_process_fsdp2_matches_replicated_and_resumes_exactly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        env.pop(k, None)
    cmd = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_port()),
        __file__,
        str(tmp_path),
    ]
    proc = subprocess.run(
        cmd, cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    # the models were sharded: every parameter a DTensor whose two shards make up the whole,
    # the declared blocks wrapped on their own, the teacher sharded too
    for rank in (0, 1):
        facts = json.loads((tmp_path / f"facts-{rank}.json").read_text())
        assert facts["sharded_models"] == ["ema", "fake", "student"]
        assert facts["all_dtensor"] and facts["blocks_wrapped"] and facts["teacher_dtensor"]
        assert facts["local_numel_sum"] == facts["full_numel"] > facts["local_numel"] > 0
        assert facts["plain_export"]

    teacher = _models(tmp_path / "teacher.safetensors")
    for name in METHODS:
        ref = next((tmp_path / "ref" / name / "digits").glob("*-*"))
        fsdp = next((tmp_path / "fsdp" / name / "digits").glob("*-*"))
        # the exported EMA student and every checkpointed model moved as in the replicated run
        _assert_same_update(
            _models(ref / "student.safetensors"),
            _models(fsdp / "student.safetensors"),
            teacher,
            f"{name} EMA student",
        )
        (m_ref, t_ref, o_ref), (m_fsdp, t_fsdp, o_fsdp) = _checkpoint(ref), _checkpoint(fsdp)
        assert m_ref["it"] == m_fsdp["it"] == ITERS and o_ref["updates"] == o_fsdp["updates"]
        for model in {k.split(".")[0] for k in t_ref}:

            def pick(t, m=model):
                return {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(m + ".")}

            init = None if model == "gan_head" else teacher
            _assert_same_update(pick(t_ref), pick(t_fsdp), init, f"{name} {model}")
        # gradient norms (scale-sensitive, unlike Adam's update): the same mean over ranks
        g_ref, g_fsdp = _grad_norms(ref), _grad_norms(fsdp)
        assert g_ref.keys() == g_fsdp.keys()
        for k in g_ref:
            assert torch.allclose(torch.tensor(g_fsdp[k]), torch.tensor(g_ref[k]), rtol=1e-4), (
                name,
                k,
            )
        # full optimizer state in the replicated format, close to the replicated run's
        for g in o_ref["optims"]:
            sr, sf = o_ref["optims"][g]["state"], o_fsdp["optims"][g]["state"]
            assert sr.keys() == sf.keys()
            for i in sr:
                assert sr[i]["step"] == sf[i]["step"]
                assert sr[i]["exp_avg"].shape == sf[i]["exp_avg"].shape
                assert torch.allclose(sf[i]["exp_avg"], sr[i]["exp_avg"], rtol=1e-3, atol=1e-7)

    # sharded checkpoint -> replicated run -> its checkpoint: the same tensors, bit for bit
    (_, t_first, o_first), (_, t_mid, o_mid) = (
        _checkpoint(tmp_path / "first"),
        _checkpoint(tmp_path / "mid"),
    )
    assert t_first.keys() == t_mid.keys() and all(
        torch.equal(t_first[k], t_mid[k]) for k in t_first
    )
    _assert_equal_optims(o_first["optims"], o_mid["optims"], "sharded -> replicated")
    # ... -> sharded again, trained on: bitwise the uninterrupted sharded run
    (m_res, t_res, o_res), (m_whole, t_whole, o_whole) = (
        _checkpoint(tmp_path / "resumed"),
        _checkpoint(next((tmp_path / "fsdp" / "cdm" / "digits").glob("cdm-*"))),
    )
    assert m_res["it"] == m_whole["it"] == ITERS and o_res["updates"] == o_whole["updates"]
    assert t_res.keys() == t_whole.keys()
    for k in t_res:
        assert torch.equal(t_res[k], t_whole[k]), k
    _assert_equal_optims(o_res["optims"], o_whole["optims"], "resumed")
    assert all(
        torch.equal(a, b) for a, b in zip(o_res["rng"]["g"], o_whole["rng"]["g"], strict=True)
    )


# ----------------------------------------------------------------------------- worker
def _method(name: str):
    """Small, fast-moving configurations (lr 1e-3, no warm-up, student every other iteration)."""
    from cdmbench.methods.cdm import CDM, CDMConfig
    from cdmbench.methods.dmd2 import DMD2, DMD2Config

    if name == "cdm":
        return CDM(
            CDMConfig(
                student_lr=1e-3, fake_lr=1e-3, warmup=0, n_max=3, update_ratio=2, cfg_aug_scale=0.0
            )
        )
    return DMD2(
        DMD2Config(
            student_lr=1e-3,
            fake_lr=1e-3,
            warmup=0,
            update_ratio=2,
            real_guidance=1.0,
            gan=name == "dmd2-gan",
        )
    )


def _backbone():
    """digits, with its residual blocks declared as FSDP units (digits declares none)."""
    from cdmbench.backbones.digits import Digits, _Block

    bb = Digits()
    bb.fsdp_wrap_classes = (_Block,)
    return bb


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from cdmbench.training.core import Trainer
    from cdmbench.training.run import train_run

    torch.set_num_threads(1)
    os.environ.update(FSDP_ENV)  # "auto" resolves to FSDP2, as under `accelerate launch --use_fsdp`
    rank = int(os.environ["RANK"])

    def cfg(shard: str, iters: int = ITERS) -> TrainConfig:
        return TrainConfig(iters=iters, batch=4, seed=0, ckpt_every=10**9, log_every=1, shard=shard)

    for name in METHODS:
        train_run(_method(name), _backbone(), cfg("none"), out / "ref" / name, sample_steps=(1,))
        train_run(_method(name), _backbone(), cfg("auto"), out / "fsdp" / name, sample_steps=(1,))

    first = Trainer(_backbone(), _method("cdm"), cfg("auto", iters=ITERS // 2), out / "first")
    first.train()
    student = first.student
    n_local = sum(sharded_param.to_local().numel() for sharded_param in student.parameters())
    total = torch.tensor(n_local)
    dist.all_reduce(total)
    ema = first.unsharded("ema")  # a collective: every rank calls
    facts = {
        "sharded_models": sorted(first.sharded_models),
        "all_dtensor": all(
            isinstance(p, DTensor) for m in first.models.values() for p in m.parameters()
        ),
        "teacher_dtensor": all(isinstance(p, DTensor) for p in first.teacher.parameters()),
        "blocks_wrapped": all(isinstance(b, FSDPModule) for b in student.blocks)
        and isinstance(student, FSDPModule),
        "local_numel": n_local,
        "local_numel_sum": int(total),
        "full_numel": sum(p.numel() for p in student.parameters()),
        "plain_export": ema is None
        if rank
        else not any(isinstance(p, DTensor) for p in ema.parameters()),
    }
    (out / f"facts-{rank}.json").write_text(json.dumps(facts))

    mid = Trainer(_backbone(), _method("cdm"), cfg("none", iters=ITERS // 2), out / "mid")
    mid.load_checkpoint(out / "first" / "checkpoint")
    mid.save_checkpoint()
    dist.barrier()  # rank 0 wrote it; the others read it next
    resumed = Trainer(_backbone(), _method("cdm"), cfg("auto"), out / "resumed")
    resumed.load_checkpoint(out / "mid" / "checkpoint")
    resumed.train()
    if rank == 0:
        teacher = _backbone().load_teacher()
        save_file(
            {k: v.contiguous() for k, v in teacher.state_dict().items()},
            str(out / "teacher.safetensors"),
        )
    dist.barrier()  # no rank tears gloo down while another still works (an abort at exit under load)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
    # every file the test checks is written and the process group is gone: leave without the
    # interpreter's teardown, where gloo's threads have aborted a finished worker under load
    # ("terminate called without an active exception"); a failure above still exits non-zero
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
