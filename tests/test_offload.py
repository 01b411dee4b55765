"""Fitting fewer GPUs: frozen models offloaded to the CPU (``backbone.offload_frozen``),
8-bit AdamW (``train.optimizer``) and the collective timeout (``train.dist_timeout_s``).

This machine has no GPU, where offloading moves weights between host and device; here the
tests check what it changes on any device: which modules carry the moving hooks (the frozen
teacher's blocks, the text encoders', the VAE's; never a trained model) and that results are
unchanged with it on.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch

from cdmbench.backbones.diffusers_base import _units
from cdmbench.backbones.sd3 import TinySD3
from cdmbench.cli import main
from cdmbench.config import run_payload
from cdmbench.methods.cdm import CDM
from cdmbench.prompts_io import Prompt
from cdmbench.training.core import TrainConfig, Trainer

PROMPTS = [Prompt("0", "a red apple on a table"), Prompt("1", "a lighthouse at night")]


def _hooked(module: torch.nn.Module) -> bool:
    units = _units(module)
    return bool(units) and all(u._forward_pre_hooks and u._forward_hooks for u in units)


def _trainer(tmp_path, **settings) -> Trainer:
    cdm = CDM(replace(CDM.default_config("tiny-sd3"), n_max=3, warmup=0, student_lr=1e-3))
    return Trainer(TinySD3(**settings), cdm, TrainConfig(iters=2, batch=2), tmp_path)


def test_offload_moves_only_frozen_models_and_changes_nothing(tmp_path):
    off = _trainer(tmp_path / "off", offload_frozen=True)
    on = _trainer(tmp_path / "on")
    bb = off.backbone
    assert _hooked(off.teacher) and len(_units(off.teacher)) > 4  # block by block
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        assert _hooked(bb.component(name)), name
        assert not any(m._forward_pre_hooks for m in on.backbone.component(name).modules())
    for name in ("student", "ema", "fake"):  # trained or updated in place: never moved
        model = off.models[name]  # (its own hooks count its calls: cdmbench.compute)
        assert not any(m._forward_pre_hooks for m in model.modules() if m is not model), name

    x = torch.randn(2, *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bb.decode(x), on.backbone.decode(x))
    c_off, c_on = bb.encode(PROMPTS), on.backbone.encode(PROMPTS)
    assert all(torch.equal(c_off.tensors[k], c_on.tensors[k]) for k in c_on.tensors)
    off.train()
    on.train()
    for a, b in zip(off.student.parameters(), on.student.parameters(), strict=True):
        assert torch.equal(a, b)


def test_offload_is_not_part_of_the_run():
    a, b = TinySD3(offload_frozen=True), TinySD3()
    assert a.run_settings() == b.run_settings()


def test_adamw8bit_steps(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    cdm = CDM(replace(CDM.default_config("tiny-sd3"), n_max=2, warmup=0))
    cfg = TrainConfig(iters=2, batch=2, optimizer="adamw8bit")
    trainer = Trainer(TinySD3(), cdm, cfg, tmp_path)
    assert all(isinstance(o, bnb.optim.AdamW8bit) for o in trainer.optims.values())
    start = [p.detach().clone() for p in trainer.student.parameters()]
    trainer.train()
    assert any(
        not torch.equal(a, b) for a, b in zip(trainer.student.parameters(), start, strict=True)
    )


def test_adamw8bit_without_bitsandbytes_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        main(["train", "cdm", "--out", str(out), "--set", "train.optimizer=adamw8bit"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.endswith("pip install bitsandbytes")
    assert not out.exists()  # before any run directory is written


def test_collective_timeout_is_a_setting_outside_the_run_hash():
    base = run_payload("cdm", TinySD3(), TrainConfig(), CDM.Config())
    later = run_payload("cdm", TinySD3(), TrainConfig(dist_timeout_s=60.0), CDM.Config())
    assert base == later and "dist_timeout_s" not in base["train"]
    accum = run_payload("cdm", TinySD3(), TrainConfig(grad_accum=2), CDM.Config())
    assert accum != base  # the effective batch is part of the run
