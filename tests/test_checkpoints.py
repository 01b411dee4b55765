"""Checkpoints: keep policy, today's single-file format, sharded (DCP) checkpoints resumed on
another number of processes, integrity per shard, preemption by signals, bf16 export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from toy import Toy

from cdmbench.methods.cdm import CDM, CDMConfig
from cdmbench.training import checkpoint
from cdmbench.training.core import CheckpointError, TrainConfig, Trainer


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**(dict(iters=10, batch=8, seed=0, ckpt_every=10**9, log_every=10**9) | kw))


def _cdm() -> CDM:
    return CDM(CDMConfig(student_lr=1e-3, fake_lr=1e-3, warmup=0, n_max=3, update_ratio=2))


def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in tr.models.items() for k, v in m.state_dict().items()}


def _trainer(path: Path, **kw) -> Trainer:
    path.mkdir(parents=True, exist_ok=True)
    return Trainer(Toy(), _cdm(), _cfg(**kw), path)


# ------------------------------------------------------------------------- one process
def test_keep_last_and_keep_every_keep_those_checkpoints_only(tmp_path):
    tr = _trainer(tmp_path / "run", iters=10, ckpt_every=2, keep_last=2, keep_every=4)
    tr.train()  # checkpoints at 2, 4, 6, 8 and 10
    ckpt = tmp_path / "run" / "checkpoint"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["it"] == 10 and [e["it"] for e in manifest["older"]] == [8, 4]
    named = {n for e in [manifest, *manifest["older"]] for n in e["sha256"]}
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([*named, "manifest.json"])
    assert {checkpoint._ITER.match(n).group(1) for n in named} == {
        "00000004",
        "00000008",
        "00000010",
    }
    with pytest.raises(Exception, match="keep_last"):
        TrainConfig(keep_last=0)


def test_a_checkpoint_in_todays_single_file_format_resumes_exactly(tmp_path):
    whole = _trainer(tmp_path / "whole", iters=6)
    whole.train()
    first = _trainer(tmp_path / "first", iters=3)
    first.train()
    ckpt = tmp_path / "first" / "checkpoint"
    # the manifest exactly as the previous code wrote it (no keep list, no format)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    old_keys = ("it", "method", "backbone", "files", "sha256")
    (ckpt / "manifest.json").write_text(json.dumps({k: manifest[k] for k in old_keys}))
    assert sorted(manifest["files"]) == ["models", "state"]
    resumed = _trainer(tmp_path / "resumed", iters=6)
    resumed.load_checkpoint(ckpt)
    assert resumed.it == 3
    resumed.train()
    a, b = _state(whole), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_export_is_the_same_run_with_half_the_file(tmp_path):
    from cdmbench.backbones.digits import Digits
    from cdmbench.training.run import STUDENT_FILE, load_run, train_run

    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = _cfg(iters=2, batch=4, export_dtype=dtype)
        runs[dtype] = train_run(_cdm(), Digits(), cfg, tmp_path / dtype, sample_steps=(1,)).run_dir
    f32, bf16 = runs["float32"], runs["bfloat16"]
    assert f32.name == bf16.name  # not part of the run's identity
    from safetensors.torch import load_file

    a, b = load_file(str(f32 / STUDENT_FILE)), load_file(str(bf16 / STUDENT_FILE))
    assert all(v.dtype == torch.bfloat16 for v in b.values())
    assert all(torch.equal(a[k].bfloat16(), b[k]) for k in a)
    loaded = load_run(bf16)  # into the backbone's dtype
    assert all(p.dtype == torch.float32 for p in loaded.student.parameters())


# ------------------------------------------------------------------------- preemption
def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cdmbench.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


TRAIN = ["train", "cdm", "--iters", "150", "--batch", "2", "--set", "train.log_every=1", "--out"]


def _interrupt(tmp_path: Path, sig: int) -> tuple[subprocess.CompletedProcess, Path, str]:
    proc = _cli([*TRAIN, "cut"], tmp_path)
    deadline = time.time() + 120
    while True:
        logs = list((tmp_path / "cut").glob("digits/cdm-*/log.jsonl"))
        if logs and len(logs[0].read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc, logs[0].parent, err


def test_sigterm_checkpoints_exits_143_and_the_rerun_is_the_uninterrupted_run(tmp_path):
    proc, run, err = _interrupt(tmp_path, signal.SIGTERM)
    assert proc.returncode == 143, err
    stop = json.loads((run / "checkpoint" / "manifest.json").read_text())["it"]
    assert 3 <= stop < 150 and f"stopped by SIGTERM at iteration {stop}" in err
    assert not (run / "student.safetensors").exists()
    rerun = _cli([*TRAIN, "cut"], tmp_path)
    whole = _cli([*TRAIN, "whole"], tmp_path)
    assert rerun.wait(timeout=300) == 0 and whole.wait(timeout=300) == 0
    ref = next((tmp_path / "whole").glob("digits/cdm-*"))
    assert (run / "student.safetensors").read_bytes() == (ref / "student.safetensors").read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_sigusr1_and_ctrl_c_checkpoint_and_exit_with_their_status(tmp_path, sig):
    proc, run, err = _interrupt(tmp_path, sig)
    assert proc.returncode == 128 + sig, err
    stop = json.loads((run / "checkpoint" / "manifest.json").read_text())["it"]
    assert f"stopped by {signal.Signals(sig).name} at iteration {stop}" in err


@pytest.mark.parametrize(("name", "procs", "nodes"), [("1node-8gpu", 8, 1), ("2nodes-8gpu", 16, 2)])
def test_shipped_accelerate_configs_are_fsdp2(name, procs, nodes):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(Path(__file__).parents[1] / "launch" / f"fsdp2-{name}.yaml"))
    assert cfg.distributed_type == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
    assert (cfg.num_processes, cfg.num_machines) == (procs, nodes)


# ---------------------------------------------------------------------- two processes
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_sharded_checkpoint_resumes_on_one_process_and_a_single_file_one_on_two(tmp_path):
    # today's format, written by one process, for the two-process worker to resume
    one = Trainer(_digits(), _cdm(), _cfg(iters=2, batch=4), tmp_path / "one")
    one.train()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=Path(__file__).parent, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    # the single-file checkpoint, loaded by two sharded processes, held the same tensors
    assert all(json.loads((tmp_path / f"legacy-{r}.json").read_text())["same"] for r in (0, 1))
    # each rank wrote its own shard of the two-process checkpoint and hashed it
    ckpt = tmp_path / "two" / "checkpoint"
    manifest, tensors, other = checkpoint.read(ckpt)
    assert manifest["format"] == "dcp" and manifest["world"] == 2 and manifest["it"] == 2
    names = sorted(Path(n).name for n in manifest["sha256"])
    # saved twice at iteration 2: the committed folder was not overwritten, only replaced
    assert manifest["files"]["dir"] == "step-00000002-1" and not manifest["older"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "step-00000002-1"]
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]

    # resharded onto one process: the full tensors, the optimizer, fresh generators
    tr = Trainer(_digits(), _cdm(), _cfg(iters=4, batch=4), tmp_path / "two-on-one")
    tr.load_checkpoint(ckpt)
    assert tr.it == 2 and tr.updates == other["updates"]
    state = _state(tr)
    assert state.keys() == tensors.keys() and all(torch.equal(state[k], tensors[k]) for k in state)
    for g, o in tr.optims.items():
        mine = o.state_dict()["state"]
        for i, entry in other["optims"][g]["state"].items():
            assert torch.equal(mine[i]["exp_avg_sq"], entry["exp_avg_sq"])
            assert torch.equal(mine[i]["step"], entry["step"])
    assert torch.equal(tr.g_shared.get_state(), other["rng"]["g_shared"])
    g = torch.Generator().manual_seed(checkpoint.rank_seed(0, 2, 0))
    assert torch.equal(tr.g.get_state(), g.get_state())
    tr.train()
    assert tr.it == 4 and all(torch.isfinite(p).all() for p in tr.student.parameters())

    # a damaged shard is found before anything is loaded
    shard = ckpt / manifest["files"]["dir"] / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    fresh = Trainer(_digits(), _cdm(), _cfg(iters=4, batch=4), tmp_path / "fresh")
    with pytest.raises(CheckpointError, match="__1_0.distcp is corrupt"):
        fresh.load_checkpoint(ckpt)
    assert fresh.it == 0


def _digits():
    """digits, with its residual blocks declared as FSDP units (digits declares none)."""
    from cdmbench.backbones.digits import Digits, _Block

    bb = Digits()
    bb.fsdp_wrap_classes = (_Block,)
    return bb


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    two = Trainer(_digits(), _cdm(), _cfg(iters=2, batch=4, shard="fsdp2"), out / "two")
    two.train()
    two.save_checkpoint()  # the same iteration again (a finished run not yet exported, rerun)
    legacy = Trainer(_digits(), _cdm(), _cfg(iters=4, batch=4, shard="fsdp2"), out / "legacy2")
    legacy.load_checkpoint(out / "one" / "checkpoint")
    saved = load_file(str(Trainer.checkpoint_files(out / "one" / "checkpoint")["models"]))
    full = {f"{n}.{k}": v for n in legacy.models for k, v in legacy.full_state_dict(n).items()}
    same = rank != 0 or (
        full.keys() == saved.keys() and all(torch.equal(full[k], saved[k]) for k in full)
    )
    (out / f"legacy-{rank}.json").write_text(json.dumps({"same": bool(same)}))
    legacy.train()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
    # every file the test checks is written and the process group is gone: leave without the
    # interpreter's teardown, where gloo's threads have aborted a finished worker under load
    # ("terminate called without an active exception"); a failure above still exits non-zero
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
