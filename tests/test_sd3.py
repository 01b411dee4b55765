"""`sd3` / `tiny-sd3` (Esser et al. 2024, arXiv 2403.03206): cdmbench's sampler, conditioning
and decoding against diffusers' own StableDiffusion3Pipeline on tiny random-weight
components, each method's training on them, and export back to a diffusers pipeline.
The backbone contract itself (shapes, CFG, settings, ...) is checked by test_backbones.py."""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import replace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from cdmbench import flow
from cdmbench.backbones import BACKBONES, get_backbone
from cdmbench.backbones.sd3 import (
    HUB_ID,
    SCHEDULE_FILE,
    SD3,
    TINY_RESOLUTION,
    TinySD3,
    export_student,
)
from cdmbench.backbones.tiny_tokenizers import clip_tokenizer, t5_tokenizer
from cdmbench.errors import MissingWeightsError, UserError
from cdmbench.prompts_io import Prompt
from cdmbench.registry import METHODS
from cdmbench.training.core import TrainConfig, Trainer

TOL = 1e-5
PROMPTS = [
    Prompt("p0", "a red bicycle leaning against a brick wall"),
    Prompt("p1", "portrait of an old fisherman at dawn, oil painting"),
]
TEXTS = [p.text for p in PROMPTS]


@pytest.fixture(scope="module")
def bb() -> TinySD3:
    return TinySD3()


@pytest.fixture(scope="module")
def teacher(bb: TinySD3) -> torch.nn.Module:
    return bb.load_teacher()


@pytest.fixture(scope="module")
def pipe(bb: TinySD3, teacher) -> StableDiffusion3Pipeline:
    return bb.pipeline(transformer=teacher)


def _noise(bb: TinySD3, n: int = 2) -> torch.Tensor:
    return flow.seeded_noise(bb.latent_shape, list(range(n)))


def _run_pipe(pipe, latents, pre_sigmas, w, output_type="latent", **kw) -> torch.Tensor:
    res = TINY_RESOLUTION
    return pipe(
        prompt=TEXTS[: len(latents)],
        latents=latents.clone(),
        height=res,
        width=res,
        num_inference_steps=len(pre_sigmas),
        sigmas=list(pre_sigmas),
        guidance_scale=w,
        output_type=output_type,
        **kw,
    ).images


# -------------------------------------------------------------------------- structure
def test_registered_and_shapes():
    assert BACKBONES.get("tiny-sd3") is TinySD3 and BACKBONES.get("sd3") is SD3
    b = get_backbone("tiny-sd3")
    assert (b.name, b.latent_shape, b.shift) == ("tiny-sd3", (16, 8, 8), 3.0)
    assert b.default_teacher_steps == 4
    assert b.default_teacher_guidance == 7.0
    assert [c.__name__ for c in b.fsdp_wrap_classes] == ["JointTransformerBlock"]
    real = SD3(weights=".")  # an existing directory: nothing is read until first use
    assert real.latent_shape == (16, 128, 128) and real.default_teacher_steps == 28
    call = inspect.signature(StableDiffusion3Pipeline.__call__).parameters
    assert real.default_teacher_guidance == call["guidance_scale"].default
    assert get_backbone("tiny-sd3", settings={"resolution": "128"}).latent_shape == (16, 16, 16)
    with pytest.raises(UserError, match="multiple of 16"):
        SD3(weights=".", resolution=100)
    with pytest.raises(UserError, match="did you mean 'backbone.resolution'"):
        get_backbone("sd3", settings={"resolutoin": 64})


def test_scheduler_shifts_custom_sigmas():
    """diffusers 0.42 shifts custom sigma lists too (DESIGN.md section 2 is right)."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pre = [1.0, 0.75, 0.5, 0.25]
    sched.set_timesteps(sigmas=pre)
    assert sched.sigmas.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-6)
    assert sched.sigmas.tolist() == pytest.approx(flow.explicit_schedule(pre, 3.0), abs=1e-6)
    assert sched.timesteps.tolist() == pytest.approx([1000 * s for s in sched.sigmas[:-1].tolist()])
    assert flow.unshift(flow.explicit_schedule(pre, 3.0)[:-1], 3.0) == pytest.approx(pre, abs=1e-12)
    # without sigmas the grid is linspace(1, shift(1/1000), n) before the shift: not uniform
    sched.set_timesteps(4)
    assert sched.sigmas[-2].item() < 0.01 < flow.uniform_schedule(4, 3.0)[-2]


# ------------------------------------------------------------------------- conditioning
def test_tiny_tokenizers():
    clip = clip_tokenizer()  # all merges: OpenAI's / open_clip's ids
    assert len(clip) == 49408
    assert clip("A photo of a Cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    t5 = t5_tokenizer()
    ids = t5(["a photo of a cat", ""], padding="max_length", max_length=8).input_ids
    assert ids[1] == [1] + [0] * 7  # eos, then pad: T5's ids
    assert 2 not in ids[0] and ids[0][-3:] == [1, 0, 0]  # no unknown pieces


def test_encode_matches_pipeline_and_caches(bb: TinySD3, pipe):
    cond = bb.encode(PROMPTS)
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(
        TEXTS, None, None, do_classifier_free_guidance=True
    )
    assert cond.tensors["prompt_embeds"].shape == (2, 77 + 256, 64)
    assert torch.allclose(cond.tensors["prompt_embeds"], emb, atol=1e-6)
    assert torch.allclose(cond.tensors["pooled_projections"], pooled, atol=1e-6)
    assert torch.allclose(cond.null["prompt_embeds"], neg[:1], atol=1e-6)  # the "" negative prompt
    assert torch.allclose(cond.null["pooled_projections"], neg_pooled[:1], atol=1e-6)
    cached = set(bb._embeds.keys())
    again = bb.encode(PROMPTS[::-1])
    assert set(bb._embeds.keys()) == cached  # no text encoded twice
    assert torch.equal(again.tensors["prompt_embeds"][0], cond.tensors["prompt_embeds"][1])
    assert len(bb.prompts("train")) == 150 and bb.real_latents() is None  # general-train


# --------------------------------------------------------------------- sampler, decode
@pytest.mark.parametrize(
    "pre", [[1.0, 2 / 3, 1 / 3], [1.0, 0.6, 0.3, 0.1]], ids=["uniform3", "explicit4"]
)
@pytest.mark.parametrize("w", [1.0, 7.0])
def test_sampler_matches_pipeline(bb: TinySD3, teacher, pipe, pre, w):
    sigmas = flow.uniform_schedule(3, 3.0) if len(pre) == 3 else flow.explicit_schedule(pre, 3.0)
    noise = _noise(bb)
    cond = bb.encode(PROMPTS)
    ours = flow.sample(lambda x, s: bb.velocity(teacher, x, s, cond, w), noise, sigmas)
    ref = _run_pipe(pipe, noise, pre, w)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(sigmas, abs=1e-6)
    assert (ours - ref).abs().max().item() <= TOL


def test_decode_matches_pipeline(bb: TinySD3, pipe):
    noise = _noise(bb)
    latents = _run_pipe(pipe, noise, [1.0, 0.5], 7.0)
    images = _run_pipe(pipe, noise, [1.0, 0.5], 7.0, output_type="pt")
    ours = bb.decode(latents)
    assert ours.shape == images.shape == (2, 3, 64, 64) and ours.dtype == torch.float32
    assert (ours - images).abs().max().item() <= 1e-6
    back = bb.encode_images(ours)
    assert back.shape == latents.shape


def test_drop_t5_as_pipeline_without_t5(teacher):
    bb = TinySD3(drop_t5=True)
    assert bb.component("text_encoder_3") is None and "text_encoder_3" not in bb.parts
    cond = bb.encode(PROMPTS)
    assert cond.tensors["prompt_embeds"].shape == (2, 77 + 256, 64)
    assert not cond.tensors["prompt_embeds"][:, 77:].any()
    noise = _noise(bb)
    sigmas = flow.uniform_schedule(2, 3.0)
    ours = flow.sample(lambda x, s: bb.velocity(teacher, x, s, cond, 7.0), noise, sigmas)
    ref = _run_pipe(bb.pipeline(transformer=teacher), noise, [1.0, 0.5], 7.0)
    assert (ours - ref).abs().max().item() <= TOL


def test_gradient_checkpointing_same_gradients(bb: TinySD3, teacher):
    ckpt = TinySD3(gradient_checkpointing=True)
    cond = bb.encode(PROMPTS)
    x, s = _noise(bb), torch.tensor([0.7, 0.3])
    grads = []
    for b in (bb, ckpt):
        student = b.make_student(teacher)
        b.velocity(student, x, s, cond, 3.0).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    assert ckpt.make_student(teacher).gradient_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# -------------------------------------------------------------- training and export
# DMD2 without its GAN head here (tests/test_dmd2_gan.py trains it with one)
OVERRIDES = {
    "cdm": {"n_max": 3},
    "dmd": {"reg_pairs": 4},
    "dmd2": {"gan": False},
    "cd": {"cache_size": 4},
}


@pytest.mark.parametrize("method", list(OVERRIDES))
def test_method_trains_and_exports(bb: TinySD3, method, tmp_path):
    cls = METHODS.get(method)
    m = cls(replace(cls.default_config("tiny-sd3"), **OVERRIDES[method]))
    cfg = TrainConfig(iters=2, batch=2, ckpt_every=10**9, log_every=1)
    trainer = Trainer(bb, m, cfg, tmp_path / "run")
    trainer.train()
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["it"] for r in logs] == [1, 2]
    assert all(math.isfinite(v) for r in logs for k, v in r.items() if k not in ("it", "time"))
    assert any(k.endswith("grad_norm") for k in logs[-1])

    # load_run's path: a fresh teacher-architecture module takes the saved EMA state
    student = bb.load_teacher()
    student.load_state_dict(trainer.ema.state_dict())

    spec = m.sampler(2, bb.shift)
    out = export_student(
        bb, trainer.ema, tmp_path / "export", spec.sigmas, stochastic=spec.stochastic
    )
    info = json.loads((out / SCHEDULE_FILE).read_text())
    assert info["sigmas"] == spec.sigmas and info["stochastic"] == spec.stochastic
    loaded = bb.load_teacher(str(out))  # a pipeline directory as teacher weights
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), student.state_dict().values(), strict=True)
    )

    exported = StableDiffusion3Pipeline.from_pretrained(out)  # offline (conftest)
    exported.set_progress_bar_config(disable=True)
    assert exported.scheduler.config.shift == 3.0
    assert exported.scheduler.config.stochastic_sampling == spec.stochastic
    noise = _noise(bb)
    cond = bb.encode(PROMPTS)
    torch.manual_seed(11)  # the pipeline's re-noising draws come from the global RNG
    ours = flow.sample(
        lambda x, s: bb.velocity(student, x, s, cond),
        noise,
        spec.sigmas,
        stochastic=spec.stochastic,
        renoise=lambda n: torch.randn(noise.shape),
    )
    torch.manual_seed(11)
    ref = _run_pipe(exported, noise, info["pipeline_sigmas"], info["guidance_scale"])
    assert exported.scheduler.sigmas.tolist() == pytest.approx(spec.sigmas, abs=1e-6)
    assert (ours - ref).abs().max().item() <= TOL
    if method == "cdm":
        images = _run_pipe(exported, noise, info["pipeline_sigmas"], 1.0, output_type="pt")
        assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


# ------------------------------------------------------------------------------ weights
def test_hub_weights_resolve_at_first_use(tmp_path, monkeypatch):
    """SD3 reads nothing at construction: a hub id that is not cached, with the hub offline,
    fails at first use (teacher or text encoders), in one line naming what to fetch."""
    import huggingface_hub.constants as hf

    monkeypatch.delenv("CDMBENCH_SD3", raising=False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    bb = SD3()
    assert bb.weights == HUB_ID
    for use in (bb.load_teacher, lambda: bb.encode(PROMPTS)):
        with pytest.raises(MissingWeightsError) as e:
            use()
        assert f"`hf download {HUB_ID}`" in str(e.value) and "\n" not in str(e.value)


def test_sd3_from_directory_and_linked_export(bb: TinySD3, teacher, tmp_path):
    """The `sd3` loading path (a diffusers directory) and the export that links components."""
    base = export_student(bb, teacher, tmp_path / "base", flow.uniform_schedule(2, 3.0))
    assert not (base / "text_encoder").is_symlink()
    sd3 = SD3(weights=base, resolution=TINY_RESOLUTION)
    assert sd3.weights_dir == base and sd3.latent_shape == bb.latent_shape
    t2 = sd3.load_teacher()
    x, s = _noise(bb), torch.tensor([0.9, 0.4])
    ref = bb.velocity(teacher, x, s, bb.encode(PROMPTS), 7.0)
    assert (sd3.velocity(t2, x, s, sd3.encode(PROMPTS), 7.0) - ref).abs().max().item() <= TOL
    assert (sd3.decode(x) - bb.decode(x)).abs().max().item() <= 1e-6
    sigmas = flow.uniform_schedule(1, 3.0)
    out = export_student(sd3, sd3.make_student(t2), tmp_path / "linked", sigmas)
    assert (out / "text_encoder_3").is_symlink() and not (out / "transformer").is_symlink()
    exported = StableDiffusion3Pipeline.from_pretrained(out)
    exported.set_progress_bar_config(disable=True)
    latents = _run_pipe(exported, x, [1.0], 1.0)
    ours = flow.sample(lambda z, t: sd3.velocity(t2, z, t, sd3.encode(PROMPTS)), x, sigmas)
    assert (ours - latents).abs().max().item() <= TOL
