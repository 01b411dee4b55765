"""LoRA (peft) training on tiny-sd3: only the adapters train, the run's student is the merged
model, and the exported adapter loads with plain diffusers onto the teacher's pipeline and
samples what cdmbench samples."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from cdmbench import flow
from cdmbench.backbones.sd3 import SCHEDULE_FILE, TINY_RESOLUTION, TinySD3
from cdmbench.cli import app
from cdmbench.errors import UserError
from cdmbench.methods.cdm import CDM
from cdmbench.prompts_io import Prompt
from cdmbench.training.core import TrainConfig, Trainer
from cdmbench.training.run import ADAPTER_FILE, load_run, train_run

TEXTS = ["a red apple on a table", "a lighthouse at night"]


def _cdm() -> CDM:
    # large learning rates, no warm-up: two iterations move the adapters well away from B = 0
    cfg = replace(CDM.default_config("tiny-sd3"), n_max=3, student_lr=1e-2, fake_lr=1e-2, warmup=0)
    return CDM(cfg)


def test_only_adapters_train(tmp_path):
    bb = TinySD3(lora_rank=4)
    trainer = Trainer(bb, _cdm(), TrainConfig(iters=1, batch=2), tmp_path / "run")
    for group, params in trainer._params.items():
        model = trainer.models[trainer.specs[group].model]
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert names and all("lora_" in n for n in names), group
        assert len(params) == len(names)
        assert any(n.endswith("add_q_proj.lora_A.default.weight") for n in names)  # joint attention
    frozen = {
        n: p.detach().clone() for n, p in trainer.student.named_parameters() if "lora_" not in n
    }
    trainer.train()
    assert trainer.updates == {"fake": 1, "student": 1}
    assert all(
        torch.equal(p, frozen[n]) for n, p in trainer.student.named_parameters() if n in frozen
    )


def test_lora_export_loads_in_diffusers(tmp_path):
    bb = TinySD3(lora_rank=4, lora_alpha=8.0)
    res = train_run(_cdm(), bb, TrainConfig(iters=2, batch=2, log_every=1), tmp_path / "runs")
    assert (res.run_dir / ADAPTER_FILE).is_file()
    out = tmp_path / "export"
    r = CliRunner().invoke(app, ["export", str(res.run_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    run = load_run(res.run_dir)  # student.safetensors: the merged weights, the teacher's keys
    info = json.loads((out / SCHEDULE_FILE).read_text())
    spec = run.method.sampler(4, run.backbone.shift)
    noise = flow.seeded_noise(bb.latent_shape, [0, 1])
    cond = run.backbone.encode([Prompt(str(i), t) for i, t in enumerate(TEXTS)])
    ours = flow.sample(
        lambda x, s: run.backbone.velocity(run.student, x, s, cond), noise, spec.sigmas
    )

    plain = TinySD3()  # the teacher's pipeline, then the adapter through diffusers alone
    pipe = plain.pipeline(transformer=plain.load_teacher())

    def sample() -> torch.Tensor:
        return pipe(
            prompt=TEXTS,
            latents=noise.clone(),
            height=TINY_RESOLUTION,
            width=TINY_RESOLUTION,
            num_inference_steps=info["num_inference_steps"],
            sigmas=info["pipeline_sigmas"],
            guidance_scale=1.0,
            output_type="latent",
        ).images

    teacher_only = sample()
    pipe.load_lora_weights(out)
    theirs = sample()
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (teacher_only - theirs).abs().max().item() > 1e-3  # the adapter is not a no-op


def test_lora_settings_checked():
    with pytest.raises(UserError, match="lora_rank"):
        TinySD3(lora_rank=-1)
