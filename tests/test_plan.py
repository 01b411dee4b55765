"""`cdmbench plan`: the inventory against real built models, the arithmetic, and the CLI."""

from __future__ import annotations

import re

import pytest
from cli_run import run

from cdmbench.backbones.sd3 import TinySD3
from cdmbench.methods.cd import CD
from cdmbench.methods.cdm import CDM
from cdmbench.plan import _all_figures, build_architecture, estimate, inventory, largest_batch
from cdmbench.training.core import TrainConfig, Trainer


def numel(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("method_cls", [CDM, CD])
def test_inventory_counts_the_models_a_trainer_builds(tmp_path, method_cls):
    """Every model the real Trainer holds, with its parameter count and trained or not, and
    the frozen components, equal plan's meta-device inventory."""
    bb = TinySD3()
    method = method_cls(method_cls.Config(cache_size=4) if method_cls is CD else None)
    trainer = Trainer(bb, method, TrainConfig(iters=1, batch=2), tmp_path)
    arch = build_architecture(TinySD3, bb.settings, device="cpu")
    plan_models = {m.name: m for m in inventory(arch, method_cls)}
    real = {"teacher": trainer.teacher, **trainer.models}
    trained = {s.model for s in trainer.specs.values()}
    for name, model in real.items():
        assert plan_models[name].params == numel(model), name
        assert plan_models[name].trained == (name in trained), name
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert plan_models[name].params == numel(bb.component(name)), name
    assert set(plan_models) == set(real) | {
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    }


def test_sharding_divides_by_n_and_accumulation_cuts_activations():
    arch = build_architecture(TinySD3, TinySD3.Settings(), device="cpu")
    one = estimate(arch, CDM, 8, gpus=1)
    four = estimate(arch, CDM, 8, gpus=4, shard="fsdp2")
    for row in ("weights: student", "weights: teacher", "gradients", "optimizer"):
        assert four.rows[row] == pytest.approx(one.rows[row] / 4)
    assert four.rows["weights: text_encoder_3"] == one.rows["weights: text_encoder_3"]
    replicated = estimate(arch, CDM, 8, gpus=4, shard="none")
    assert replicated.rows["weights: student"] == one.rows["weights: student"]
    accum = estimate(arch, CDM, 2, grad_accum=4)
    assert accum.batch == 8 and accum.micro_batch == 2
    assert accum.rows["activations"] == pytest.approx(one.rows["activations"] / 4)
    assert accum.rows["optimizer"] == one.rows["optimizer"]
    offload = estimate(arch, CDM, 8, offload_frozen=True)
    assert "weights: teacher" not in offload.rows and offload.total < one.total
    # two forwards with gradients per CDM student update, one per DMD2-like method
    assert CDM.grad_forwards["student"] == 2
    assert largest_batch(lambda b: b <= 37) == 37 and largest_batch(lambda b: False) == 0


def _gb(text: str, what: str) -> float:
    return float(re.search(rf"{what}: ([\d.]+) of", text).group(1))


def test_plan_cli_paper_recipe(capsys):
    code, out, err = run(capsys, "plan", "--config", "cdm-sd3", "--gpus", "8", "--gpu-memory", "80")
    assert code == 0, err
    assert "fits:" in out and 40 <= _gb(out, "fits") <= 70
    best = int(re.search(r"largest batch per GPU that fits: (\d+)", out).group(1))
    assert best >= 16

    code, out, _ = run(
        capsys, "plan", "--config", "cdm-sd3", "--gpus", "8", "--gpu-memory", "80",
        "--set", "backbone.gradient_checkpointing=false",
    )  # fmt: skip
    assert code == 0
    assert "does not fit" in out and _gb(out, "does not fit") > 150
    best = int(re.search(r"largest batch per GPU that fits: (\d+)", out).group(1))
    assert 0 < best < 16

    code, out, _ = run(capsys, "plan", "--config", "cdm-sd3", "--gpus", "1", "--gpu-memory", "80")
    assert code == 0 and "does not fit" in out
    assert "train.grad_accum=" in out and "backbone.offload_frozen=true" in out
    code, out, _ = run(capsys, "plan", "--config", "cdm-sd3", "--gpus", "1", "--gpu-memory", "24")
    assert code == 0 and "nothing makes it fit" in out


def test_plan_without_recipe_and_on_longcat(capsys):
    code, out, err = run(capsys, "plan", "dmd2", "--backbone", "sd3", "--gpus", "8")
    assert code == 0, err
    assert "dmd2 on sd3" in out
    code, out, err = run(capsys, "plan", "--config", "cdm-longcat", "--gpus", "8")
    if "longcat" in _all_figures():
        assert code == 0, err
        assert "cdm on longcat" in out
    else:  # figures not measured yet: one line saying how to measure them
        assert code == 2 and "activation_figures.py --backbone longcat" in err


def test_gpu_overheads_are_rows_of_their_own_and_cpu_plans_have_none():
    from dataclasses import replace

    from cdmbench.plan import Overheads

    settings = TinySD3.Settings()
    cpu = estimate(build_architecture(TinySD3, settings, device="cpu"), CDM, 8, gpus=2)
    gpu_arch = build_architecture(TinySD3, settings, device="cuda")
    gpu_arch = replace(gpu_arch, dtype="float32", train_dtype="float32")  # as on the CPU
    gpu = estimate(gpu_arch, CDM, 8, gpus=2)
    extra = ("allocator slack", "CUDA context", "NCCL buffers")
    assert not set(extra) & set(cpu.rows) and set(extra) <= set(gpu.rows)
    assert gpu.rows["CUDA context"] == Overheads().cuda_context_gb * 1e9
    per_step = sum(cpu.rows[k] for k in ("activations", "gathered blocks", "latents, conditions"))
    assert gpu.rows["allocator slack"] == pytest.approx(Overheads().fragmentation * per_step)
    assert gpu.total - cpu.total == pytest.approx(sum(gpu.rows[k] for k in extra))
    assert "NCCL buffers" not in estimate(gpu_arch, CDM, 8, gpus=1).rows
    none = estimate(gpu_arch, CDM, 8, gpus=2, overheads=Overheads(0.0, 0.0, 0.0))
    assert none.total == pytest.approx(cpu.total)
    # latents and conditions grow with the batch
    assert estimate(gpu_arch, CDM, 16).rows["latents, conditions"] == pytest.approx(
        2 * gpu.rows["latents, conditions"]
    )


def test_disk_embedding_cache_takes_the_text_encoders_off_the_gpu():
    settings = TinySD3.Settings(embed_cache="disk")
    online = estimate(build_architecture(TinySD3, TinySD3.Settings()), CDM, 8)
    cached = estimate(build_architecture(TinySD3, settings), CDM, 8)
    encoders = {k for k in online.rows if k.startswith("weights: text_encoder")}
    assert len(encoders) == 3 and not encoders & set(cached.rows)
    assert cached.total == pytest.approx(online.total - sum(online.rows[k] for k in encoders))
