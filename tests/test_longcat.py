"""`longcat` / `tiny-longcat`: cdmbench's sampler against diffusers' LongCatImagePipeline.

LongCat-Image: Meituan LongCat Team, "LongCat-Image Technical Report", arXiv:2512.07584.
Everything runs on the tiny variant (random weights, offline, float32 on CPU). The backbone
contract itself (shapes, CFG, settings, weights errors, ...) is checked by test_backbones.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cdmbench import flow
from cdmbench.backbones import get_backbone
from cdmbench.backbones.diffusers_base import build_tiny_states, tiny_states
from cdmbench.backbones.longcat import (
    TINY_SCHEDULER,
    LongCat,
    TinyLongCat,
    image_seq_len,
    shift_for,
)
from cdmbench.errors import UserError
from cdmbench.prompts_io import Prompt
from cdmbench.registry import BACKBONES, METHODS
from cdmbench.training.core import TrainConfig, Trainer

PROMPTS = [
    Prompt("fox", "a red fox curled up in fresh snow, soft morning light"),
    Prompt("sign", "a wooden sign that says 'LongCat' in a quiet garden"),
]
STEPS = 4


@pytest.fixture(scope="module")
def bb() -> TinyLongCat:
    return TinyLongCat()


@pytest.fixture(scope="module")
def teacher(bb):
    return bb.load_teacher()


def _pipeline(bb: TinyLongCat, transformer):
    """diffusers' own pipeline, assembled from the backbone's components."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline

    pipe = LongCatImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler_config),
        vae=bb.vae,
        text_encoder=bb.text_encoder,
        tokenizer=bb.tokenizer,
        text_processor=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(bb, teacher):
    return _pipeline(bb, teacher)


def _noise(bb) -> torch.Tensor:
    return flow.seeded_noise(bb.latent_shape, [flow.sample_seed(0, p.id, 0) for p in PROMPTS])


def _diffusers(bb, pipe, noise, w: float, renorm: bool = False, output_type: str = "latent"):
    out = pipe(
        prompt=[p.text for p in PROMPTS],
        height=bb.height,
        width=bb.width,
        latents=bb.pack(noise),
        num_inference_steps=STEPS,
        guidance_scale=w,
        output_type=output_type,
        enable_prompt_rewrite=False,
        enable_cfg_renorm=renorm,
        cfg_renorm_min=0.0,
    ).images
    return out if output_type != "latent" else bb.unpack(out, *bb.latent_shape[1:])


def _cdmbench(bb, model, noise, w: float) -> torch.Tensor:
    cond = bb.encode(PROMPTS)
    return flow.sample(lambda x, s: bb.velocity(model, x, s, cond, w), noise, bb.schedule(STEPS))


# ------------------------------------------------------------------------ conventions
def test_registry_and_shapes(bb):
    assert {"longcat", "tiny-longcat"} <= set(BACKBONES.names())
    assert BACKBONES.get("longcat") is LongCat and BACKBONES.get("tiny-longcat") is TinyLongCat
    assert isinstance(get_backbone("tiny-longcat"), TinyLongCat)
    assert bb.latent_shape == (16, 8, 8) and bb.dtype == torch.float32
    assert bb.default_teacher_steps == STEPS and bb.default_teacher_guidance == 4.5
    assert bb.real_latents() is None
    assert get_backbone("tiny-longcat", resolution=(64, 128)).latent_shape == (16, 8, 16)
    with pytest.raises(UserError, match="multiple of 16"):
        TinyLongCat(resolution=72)


def test_shift_is_the_pipeline_dynamic_shift(bb):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import calculate_shift

    mu = calculate_shift(image_seq_len(64, 64, 8))  # 16 packed tokens
    assert bb.shift == pytest.approx(math.exp(mu), rel=1e-12)
    # 1024 x 1024: 4096 tokens, mu = max_shift
    assert shift_for(TINY_SCHEDULER, image_seq_len(1024, 1024, 8)) == pytest.approx(math.exp(1.15))
    # exponential time shift with mu == cdmbench's k s / (1 + (k - 1) s) with k = exp(mu)
    sched = FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler_config)
    s = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    theirs = torch.as_tensor(sched.time_shift(mu, 1.0, s.numpy()))
    assert torch.allclose(theirs, flow.time_shift(s, bb.shift), atol=1e-12, rtol=0)
    # the schedule the pipeline runs is the backbone's default uniform schedule
    sched.set_timesteps(sigmas=[1 - i / STEPS for i in range(STEPS)], mu=mu)
    ours = torch.tensor(bb.schedule(STEPS), dtype=torch.float64)
    assert torch.allclose(sched.sigmas.double(), ours, atol=1e-7)


def test_encode_is_the_pipeline_prompt_encoding(bb, pipe):
    cond = bb.encode(PROMPTS)
    ref, _ = pipe.encode_prompt(prompt=[p.text for p in PROMPTS])
    assert cond.tensors["prompt_embeds"].shape == (2, 512, 32)
    assert torch.allclose(cond.tensors["prompt_embeds"], ref, atol=1e-6, rtol=0)
    null, _ = pipe.encode_prompt(prompt="")
    assert torch.equal(cond.null["prompt_embeds"], bb.null_cond()["prompt_embeds"])
    assert torch.allclose(bb.null_cond()["prompt_embeds"], null, atol=1e-6, rtol=0)
    again = bb.encode(PROMPTS[::-1]).tensors["prompt_embeds"]  # cached per prompt text
    assert torch.equal(again, cond.tensors["prompt_embeds"].flip(0))


def test_prompts_are_the_general_set(bb):
    assert len(bb.prompts("train")) == len(bb.prompts("test")) > 100
    with pytest.raises(ValueError, match="unknown split"):
        bb.prompts("val")


# ------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("w", [1.0, 4.5])
def test_sampler_matches_diffusers_pipeline(bb, teacher, pipe, w):
    noise = _noise(bb)
    ref = _diffusers(bb, pipe, noise, w)
    ours = _cdmbench(bb, teacher, noise, w)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours - noise).abs().max().item() > 0.1  # the network did something


def test_guidance_changes_the_sample(bb, teacher):
    noise = _noise(bb)
    guided, plain = _cdmbench(bb, teacher, noise, 4.5), _cdmbench(bb, teacher, noise, 1.0)
    assert (guided - plain).abs().max() > 1e-3


def test_cfg_renorm_matches_diffusers_pipeline(bb, teacher, pipe):
    renorm = TinyLongCat(cfg_renorm=True)
    noise = _noise(bb)
    ref = _diffusers(bb, pipe, noise, 4.5, renorm=True)
    assert (_cdmbench(renorm, teacher, noise, 4.5) - ref).abs().max().item() <= 1e-5


def test_decode_is_the_pipeline_decode(bb, pipe):
    noise = _noise(bb)
    latents = _diffusers(bb, pipe, noise, 4.5)
    images = _diffusers(bb, pipe, noise, 4.5, output_type="pt")
    ours = bb.decode(latents)
    assert ours.shape == (2, 3, 64, 64) and ours.dtype == torch.float32
    assert 0 <= ours.min() and ours.max() <= 1
    assert (ours - images).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------ models
def test_tiny_weights_are_seeded_and_a_student_reloads(bb, teacher, tmp_path):
    from safetensors.torch import save_file

    fresh = build_tiny_states(TinyLongCat, 0)["transformer"]  # seeded construction, not the cache
    assert all(
        torch.equal(fresh[k], v) for k, v in tiny_states(TinyLongCat, 0)["transformer"].items()
    )
    other = build_tiny_states(TinyLongCat, 1)["transformer"]
    assert not torch.equal(other["proj_out.weight"], fresh["proj_out.weight"])
    # load_run: a saved student state dict loads into load_teacher's architecture
    student = bb.make_student(teacher)
    with torch.no_grad():
        student.proj_out.bias.add_(1.0)
    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, path)
    rebuilt = bb.load_teacher()
    rebuilt.load_state_dict(student.state_dict())
    assert torch.equal(rebuilt.proj_out.bias, student.proj_out.bias)
    assert torch.equal(bb.load_teacher(path).proj_out.bias, student.proj_out.bias)
    assert set(bb.fsdp_wrap_classes) <= {type(m) for m in teacher.modules()}


@pytest.mark.parametrize(
    "name,over",
    [
        ("cdm", {"n_max": 3}),
        ("dmd", {"reg_pairs": 4}),
        ("dmd2", {"gan": False}),
        ("cd", {"cache_size": 4}),
    ],
)
def test_methods_train_two_iterations(bb, tmp_path, name, over):
    cls = METHODS.get(name)
    method = cls(replace(cls.default_config("tiny-longcat"), **over))
    trainer = Trainer(bb, method, TrainConfig(iters=2, batch=2), tmp_path)
    for _ in range(2):
        logs = trainer.step(trainer.next_batch())
        assert logs and all(torch.isfinite(v).all() for v in logs.values()), logs
    assert trainer.it == 2 and sum(trainer.updates.values()) >= 2


# ------------------------------------------------------------------------ weights
def test_longcat_loads_a_local_pipeline_directory(bb, teacher, tmp_path):
    """The real backbone's loading path (configs, from_pretrained of every component) on a
    diffusers directory saved from the tiny components: the same numbers as tiny-longcat."""
    bb.pipeline(teacher).save_pretrained(tmp_path)
    real = LongCat(weights=tmp_path, resolution=64)
    assert (real.latent_shape, real.shift, real.dtype) == (bb.latent_shape, bb.shift, bb.dtype)
    assert real.default_teacher_steps == 50 and real.default_teacher_guidance == 4.5
    model = real.load_teacher()
    for w in (tmp_path, tmp_path / "transformer"):
        assert torch.equal(real.load_teacher(w).proj_out.weight, model.proj_out.weight)
    noise = _noise(bb)
    ours = _cdmbench(real, model, noise, 4.5)
    assert (ours - _cdmbench(bb, teacher, noise, 4.5)).abs().max().item() <= 1e-6
    assert (real.decode(ours) - bb.decode(ours)).abs().max().item() <= 1e-6
