"""Each method as its authors run it: DMD's clip and one-step sampling, raw and EMA student
weights in evaluation, PCM's training phase edges, CDM's per-rank inner sigmas under several
processes, and the paper variants on digits."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run
from toy import Toy

from cdmbench import flow
from cdmbench.backbones import get_backbone
from cdmbench.config import resolve
from cdmbench.errors import UserError
from cdmbench.evaluate import EvalPlan, run_candidates, run_eval
from cdmbench.io import sha256_file
from cdmbench.methods.cd import CD, CDConfig, phase_end
from cdmbench.methods.cdm import CDM, CDMConfig
from cdmbench.methods.dmd import DMD, DMDConfig
from cdmbench.registry import METHODS
from cdmbench.results import ResultStore
from cdmbench.training.core import TrainConfig, Trainer
from cdmbench.training.run import RAW_FILE, STUDENT_FILE, load_run, train_run

TESTS = Path(__file__).parent


# ================================================================================ DMD
def test_dmd_clip_reaches_the_optimizer_groups(tmp_path):
    assert DMDConfig().clip == 10.0  # DMD2's code
    assert DMD.default_config("digits").clip == 10.0  # tuned: the paper variant, searched
    assert DMD.default_config("digits", "paper").clip == 10.0
    _, mc = resolve(DMD, "digits", sets=["method.clip=3.5", "method.reg_pairs=8"])
    tr = Trainer(Toy(), DMD(mc), TrainConfig(iters=1, batch=4), tmp_path / "run")
    assert tr.specs["student"].clip == 3.5 and tr.specs["fake"].clip == 3.5


def test_dmd_samples_only_at_one_step_without_renoising():
    one = DMD(DMDConfig(multistep="none"))
    assert one.sampler(1, 1.0).sigmas == [1.0, 0.0]
    with pytest.raises(UserError, match="one-step generator"):
        one.sampler(2, 1.0)
    assert DMD(DMDConfig()).sampler(2, 1.0).stochastic  # the default re-noises


# ======================================================================= raw and EMA
@pytest.fixture(scope="module")
def dmd_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    tc, mc = resolve(
        DMD, "digits", sets=["method.reg_pairs=8", "method.multistep=none"], iters=3, batch=8
    )
    return train_run(DMD(mc), get_backbone("digits"), tc, root, sample_steps=(1, 2)).run_dir


def _plan(tmp: Path, runs_root: Path, weights: str) -> EvalPlan:
    bb = get_backbone("digits")
    return EvalPlan(
        bb,
        run_candidates(runs_root, bb, ["dmd"], weights=weights),
        [1, 2],
        ["prompt_acc"],
        bb.prompts(),
        "digits",
        2,
        0,
        tmp / "samples",
        ResultStore(tmp / "results"),
        batch_size=16,
        teacher_default=False,
    )


def test_raw_and_ema_weights_are_exported_and_evaluated_apart(tmp_path, dmd_run, capsys):
    info = json.loads((dmd_run / "run.json").read_text())
    assert info["student_raw_sha256"] == sha256_file(dmd_run / RAW_FILE)
    assert info["student_sha256"] == sha256_file(dmd_run / STUDENT_FILE)
    assert info["student_raw_sha256"] != info["student_sha256"]  # 3 updates: EMA lags
    ema = load_run(dmd_run).student.state_dict()
    raw = load_run(dmd_run, weights="raw").student.state_dict()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)

    recs = {w: run_eval(_plan(tmp_path, dmd_run.parent.parent, w)) for w in ("ema", "raw")}
    for w, new in recs.items():
        # multistep="none": the 2-step job is skipped with a note, 1 step is recorded
        assert {r["steps"] for r in new} == {1}
        key = "student_raw_sha256" if w == "raw" else "student_sha256"
        assert {r["checkpoint"] for r in new} == {"sha256:" + info[key][:16]}
        assert {r["run_id"] for r in new} == {dmd_run.name + ("-raw" if w == "raw" else "")}
    assert "skipped at 2 steps" in capsys.readouterr().err
    assert recs["ema"][0]["eval_key"] != recs["raw"][0]["eval_key"]  # separate sample sets
    assert len(ResultStore(tmp_path / "results").read().records) == 2

    code, _, err = run(capsys, "eval", "--weights", "best", "--runs", str(tmp_path / "none"))
    assert code == 2 and "--weights" in err and len(err.strip().splitlines()) == 1


def test_raw_weights_are_hash_verified(tmp_path, dmd_run):
    copy = tmp_path / dmd_run.name
    shutil.copytree(dmd_run, copy)
    data = bytearray((copy / RAW_FILE).read_bytes())
    data[-1] ^= 1
    (copy / RAW_FILE).write_bytes(bytes(data))
    load_run(copy)  # the EMA weights are intact
    with pytest.raises(UserError, match="hash mismatch"):
        load_run(copy, weights="raw")
    info = json.loads((copy / "run.json").read_text())
    del info["student_raw_sha256"]  # a run exported before the raw weights were
    (copy / "run.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="no raw student weights"):
        load_run(copy, weights="raw")


# ================================================================================= CD
def _pcm_end_sigma(n: int, phases: int, grid: int) -> float:
    """PCM's training code (EulerSolver.euler_style_multiphase_pred, uniform schedule): Euler
    index j goes from sigma (j + 1) / grid down; it ends at the last phase index i <= j, at
    sigma i / grid (0.001, the smallest sigma, for i = 0: 0 on this grid)."""
    inference_indices = np.floor(np.linspace(0, grid, num=phases, endpoint=False)).astype(int)
    j = grid - 1 - n  # this grid's index n starts at sigma 1 - n / grid
    assert math.isclose((j + 1) / grid, 1 - n / grid)
    return max(i for i in inference_indices if i <= j) / grid


def test_cd_training_edges_follow_pcm_training_code():
    grid, edges = 50, (0, 12, 25, 37)
    n = torch.arange(grid)
    sig = 1 - torch.arange(grid + 1, dtype=torch.float64) / grid
    train_end = phase_end(n, edges, grid, "training")
    for k in range(grid):
        assert math.isclose(float(sig[train_end[k]]), _pcm_end_sigma(k, 4, grid), abs_tol=1e-12)
    assert sorted({round(float(sig[e]), 2) for e in train_end}) == [0.0, 0.24, 0.5, 0.74]
    inf_end = phase_end(n, edges, grid)
    assert sorted({round(float(sig[e]), 2) for e in inf_end}) == [0.0, 0.26, 0.5, 0.76]
    assert (train_end != inf_end).sum().item() == 26  # 52 % of the grid's points
    one = phase_end(n, (0,), grid, "training")  # one phase: the same either way
    assert torch.equal(one, phase_end(n, (0,), grid))


def _cd_loss(tmp_path: Path, source: str, edges: tuple[int, ...]) -> float:
    cfg = CDConfig(student_lr=1e-3, warmup=0, grid=10, edges=edges, edge_source=source)
    tr = Trainer(Toy(), CD(cfg), TrainConfig(iters=1, batch=64, seed=3), tmp_path / source)
    batch = tr.next_batch()
    return float(tr.method.losses("student", 0, batch, None, tr)["huber"].detach())


def test_cd_edge_source_reaches_the_loss(tmp_path):
    three = (0, 2, 5)  # phase ends 2, 5, 10 in inference; 10 - (5, 2, 0) = 5, 8, 10 in training
    assert (
        phase_end(torch.arange(10), three, 10, "training").tolist() == [5] * 5 + [8] * 3 + [10] * 2
    )
    assert _cd_loss(tmp_path, "training", three) != _cd_loss(tmp_path, "inference", three)
    one = [_cd_loss(tmp_path / s, s, (0,)) for s in ("training", "inference")]
    assert one[0] == one[1]


# ================================================================================ CDM
def test_cdm_one_process_draws_the_whole_schedule_from_g_shared(tmp_path):
    got = {}
    for sharing in ("length", "all"):
        m = CDM(CDMConfig(n_max=8, schedule_sharing=sharing))
        tr = Trainer(Toy(), m, TrainConfig(iters=1, batch=4, seed=5), tmp_path / sharing)
        got[sharing] = [m._schedule(tr) for _ in range(5)]
    g = torch.Generator().manual_seed(5)
    want = [flow.random_schedule(g, 1, 8, 0.25, 0.95, 1.0) for _ in range(5)]
    assert got["length"] == got["all"] == want


_SCHEDULES = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from toy import Toy
from cdmbench.methods.cdm import CDM, CDMConfig
from cdmbench.training.core import TrainConfig, Trainer
out = {}
for sharing in ("length", "all"):
    m = CDM(CDMConfig(n_max=8, schedule_sharing=sharing))
    tr = Trainer(Toy(), m, TrainConfig(iters=1, batch=4, seed=0), Path(sys.argv[2]) / sharing)
    out[sharing] = [m._schedule(tr) for _ in range(12)]
Path(sys.argv[2], f"rank{tr.rank}.json").write_text(json.dumps(out))
"""


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_cdm_two_processes_share_the_length_not_the_inner_sigmas(tmp_path):
    script = tmp_path / "schedules.py"
    script.write_text(_SCHEDULES)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(port), str(script), str(TESTS), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["all"] == r1["all"]  # today's behaviour as an option: one schedule everywhere
    assert [len(s) for s in r0["length"]] == [len(s) for s in r1["length"]]  # N shared
    inner = [(a, b) for a, b in zip(r0["length"], r1["length"], strict=True) if len(a) > 2]
    assert inner and all(a[1:-1] != b[1:-1] for a, b in inner)  # inner sigmas per rank
    assert all(s[0] == 1.0 and s[-1] == 0.0 for s in r0["length"] + r1["length"])


# ===================================================================== paper variants
PAPER = {
    "cdm": {"cfg_aug_scale": 7.0, "update_ratio": 2, "n_max": 28},
    "dmd": {"real_guidance": 3.0, "reg_weight": 0.25, "clip": 10.0},
    "cd": {"edges": (0, 12, 25, 37), "edge_source": "training", "target": "online"},
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_variant_resolves_and_trains_on_digits(tmp_path, name):
    cls = METHODS.get(name)
    sets = ["method.reg_pairs=8"] if name == "dmd" else []  # a small regression set, fast
    tc, mc = resolve(cls, "digits", sets=sets, variant="paper", iters=5, batch=8)
    for k, v in PAPER[name].items():
        assert getattr(mc, k) == v, k
    assert mc != cls.default_config("digits")  # not the tuned variant
    if name == "cdm":
        assert mc.fake_lr == 0.5 * mc.student_lr  # the paper's ratio
    assert mc.student_lr == 1e-4  # the digits base lr
    res = train_run(cls(mc), get_backbone("digits"), tc, tmp_path, sample_steps=(1,))
    info = json.loads((res.run_dir / "run.json").read_text())
    assert info["iters"] == 5 and info["variant"].startswith("paper")
    state = load_run(res.run_dir).student.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
