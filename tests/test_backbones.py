"""One conformance suite for every backbone that builds offline: the contract of
:class:`cdmbench.backbones.base.Backbone`, checked the same way on `digits`, `tiny-sd3`,
`tiny-longcat`, the toy backbone of ``tests/toy.py`` and a third-party backbone registered
through the ``cdmbench.backbones`` entry-point group (a fake installed distribution written
against the documented interface). Family-specific behaviour (pipeline equivalence, export,
T5 dropping, ...) lives in the per-backbone files; what both diffusers families share is at
the end of this one."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
import time
from dataclasses import dataclass, fields

import pytest
import torch
from toy import Toy

from cdmbench import flow
from cdmbench.backbones import get_backbone
from cdmbench.backbones.base import Backbone, Cond
from cdmbench.errors import MissingWeightsError, UserError
from cdmbench.generate import SamplerSpec, generate
from cdmbench.registry import Registry
from cdmbench.settings import as_dict

PLUGIN = '''
"""A third-party backbone, written against cdmbench's documented backbone interface."""

from dataclasses import dataclass

import torch
from torch import nn

from cdmbench import flow
from cdmbench.backbones import Backbone, BackboneSettings, Cond
from cdmbench.prompts_io import Prompt


@dataclass(frozen=True)
class RingSettings(BackboneSettings):
    width: int = 16  # hidden width of the random teacher
    teacher_steps: int = 8
    eval_metrics: tuple[str, ...] = ("latency",)


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.y = nn.Embedding(4, width)
        self.inp = nn.Linear(2 * 4 * 4 + 1, width)
        self.out = nn.Linear(width, 2 * 4 * 4)

    def forward(self, x, t, y):
        h = torch.tanh(self.inp(torch.cat([x.flatten(1), t[:, None] / 1000], 1)) + self.y(y))
        return self.out(h).view_as(x)


class Ring(Backbone):
    """Three classes of 2 x 4 x 4 latents with a random teacher."""

    name = "ring"
    Settings = RingSettings
    latent_shape = (2, 4, 4)

    def load_teacher(self, weights=None):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = Net(self.settings.width)
        return net.to(self.device).eval().requires_grad_(False)

    def prompts(self, split="train"):
        return [Prompt(f"ring-{i}", f"ring {i}", label=i) for i in range(3)]

    def encode(self, prompts):
        y = torch.tensor([3 if p.label is None else p.label for p in prompts], device=self.device)
        return Cond({"y": y}, {"y": torch.tensor([3], device=self.device)})

    def forward(self, model, x, s, cond):
        return model(x, flow.timestep(s), cond["y"])

    def decode(self, latents):
        return (latents[:, :1].float() / 4 + 0.5).clamp(0, 1)
'''


@pytest.fixture(scope="module")
def plugin_registry(tmp_path_factory) -> Registry:
    """A fresh backbone registry that sees a fake installed distribution declaring ``ring``."""
    root = tmp_path_factory.mktemp("plugin")
    pkg = root / "cdmb_test_ring"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "backbone.py").write_text(textwrap.dedent(PLUGIN))
    dist = root / "cdmb_test_ring-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cdmb-test-ring\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[cdmbench.backbones]\nring = cdmb_test_ring.backbone:Ring\n"
    )
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    yield Registry("backbone")
    sys.path.remove(str(root))
    for mod in ("cdmb_test_ring.backbone", "cdmb_test_ring"):
        sys.modules.pop(mod, None)


@dataclass
class Case:
    bb: Backbone
    teacher: torch.nn.Module


NAMES = ["digits", "tiny-sd3", "tiny-longcat", "toy", "ring"]


def _build(name: str, request) -> Backbone:
    if name == "toy":
        return Toy()
    if name == "ring":
        return request.getfixturevalue("plugin_registry").get("ring")(device="cpu")
    return get_backbone(name)


@pytest.fixture(scope="module", params=NAMES)
def case(request) -> Case:
    bb = _build(request.param, request)
    return Case(bb, bb.load_teacher())


def _inputs(bb: Backbone, n: int = 3) -> tuple[torch.Tensor, torch.Tensor, Cond]:
    x = flow.seeded_noise(bb.latent_shape, list(range(n)))
    s = torch.linspace(0.9, 0.2, n)
    prompts = bb.prompts("train")
    return x, s, bb.encode([prompts[i % len(prompts)] for i in range(n)])


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= tol


# ------------------------------------------------------------------------------ models
def test_teacher_is_fresh_frozen_and_deterministic(case):
    bb, teacher = case.bb, case.teacher
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    again = bb.load_teacher()
    assert again is not teacher
    assert all(
        torch.equal(a, b)
        for a, b in zip(teacher.state_dict().values(), again.state_dict().values(), strict=True)
    )
    assert isinstance(bb.teacher_id(), str) and bb.teacher_id() == bb.teacher_id()


def test_latent_shape_and_forward_shape(case):
    bb = case.bb
    assert isinstance(bb.latent_shape, tuple) and all(
        isinstance(d, int) and d > 0 for d in bb.latent_shape
    )
    x, s, cond = _inputs(bb)
    v = bb.forward(case.teacher, x, s, cond.tensors)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_student_and_clone_are_independent(case):
    bb, teacher = case.bb, case.teacher
    student = bb.make_student(teacher)
    assert student is not teacher and student.training
    assert all(p.requires_grad for p in student.parameters())
    copy = bb.clone(student)
    before = [p.detach().clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert not any(
        torch.equal(a, b) for a, b in zip(copy.parameters(), student.parameters(), strict=True)
    )
    assert not any(p.requires_grad for p in teacher.parameters())


# ------------------------------------------------------------------------ conditioning
def test_encode_has_one_null_row_per_key(case):
    bb = case.bb
    prompts = bb.prompts("train")[:3]
    cond = bb.encode(prompts)
    assert len(cond) == len(prompts) and set(cond.tensors) == set(cond.null)
    for k, v in cond.tensors.items():
        assert v.shape[0] == len(prompts)
        assert cond.null[k].shape == (1, *v.shape[1:])
    assert all(isinstance(p.id, str) and p.text for p in bb.prompts("test"))


def test_random_cond_is_seeded(case):
    bb = case.bb
    a = bb.random_cond(5, torch.Generator().manual_seed(3))
    b = bb.random_cond(5, torch.Generator().manual_seed(3))
    assert len(a) == 5 and set(a.tensors) == set(bb.encode(bb.prompts("train")[:1]).tensors)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# ------------------------------------------------------------------------ velocity field
@pytest.mark.parametrize("w", [1.0, 3.0])
def test_velocity_is_the_manual_cfg(case, w):
    bb, t = case.bb, case.teacher
    x, s, cond = _inputs(bb)
    v_c = bb.forward(t, x, s, cond.tensors).float()
    v_u = bb.forward(t, x, s, cond.uncond()).float()
    v = bb.velocity(t, x, s, cond, w)
    assert v.dtype == torch.float32
    assert _close(v, v_c if w == 1.0 else v_u + w * (v_c - v_u))
    u, c = bb.velocity_uc(t, x, s, cond)
    assert _close(u, v_u) and _close(c, v_c)


def test_x0_is_x_minus_sigma_v(case):
    bb, t = case.bb, case.teacher
    x, s, cond = _inputs(bb)
    v = bb.velocity(t, x, s, cond, 2.0)
    shape = (-1,) + (1,) * (x.dim() - 1)
    assert _close(bb.x0(t, x, s, cond, 2.0), x - s.view(shape) * v)


def test_schedule_ends_at_zero(case):
    for n in (1, 2, 4):
        sig = case.bb.schedule(n)
        assert len(sig) == n + 1 and sig[0] == pytest.approx(1.0) and sig[-1] == 0.0
        assert all(b < a for a, b in zip(sig, sig[1:], strict=False))


def test_per_sample_seeds_do_not_depend_on_batch_size(case):
    bb, t = case.bb, case.teacher
    prompts = bb.prompts("train")[:2] * 2
    seeds = [11, 12, 13, 14]
    spec = SamplerSpec(bb.schedule(2), guidance=2.0)
    whole = generate(bb, t, prompts, seeds, spec, batch_size=4)
    parts = generate(bb, t, prompts, seeds, spec, batch_size=3)
    assert whole.shape == (4, *bb.latent_shape) and _close(whole, parts)


# ------------------------------------------------------------------------------ pixels
def test_decode_is_images_in_unit_range(case):
    bb = case.bb
    images = bb.decode(flow.seeded_noise(bb.latent_shape, [0, 1]))
    assert images.dim() == 4 and images.shape[0] == 2 and images.dtype == torch.float32
    assert images.shape[1] in (1, 3) and 0 <= images.min() and images.max() <= 1


# ---------------------------------------------------------------------------- settings
def test_settings_defaults_round_trip_and_hash_part(case, request):
    bb = case.bb
    cls = type(bb)
    assert isinstance(bb.settings, cls.Settings) and bb.settings == cls.Settings()
    assert (bb.default_teacher_steps, bb.default_teacher_guidance) == (
        bb.settings.teacher_steps,
        bb.settings.teacher_guidance,
    )
    # through JSON (run.json) and back: the same settings and the same hashed part
    stored = json.loads(json.dumps(as_dict(bb.settings)))
    assert cls.make_settings(stored) == bb.settings
    assert json.loads(json.dumps(bb.run_settings())) == bb.run_settings()
    rebuilt = cls(device="cpu", settings=bb.run_settings())
    assert rebuilt.run_settings() == bb.run_settings()
    # evaluation defaults are not part of a run's identity
    assert not {"eval_batch", "eval_samples", "eval_metrics", "eval_prompts"} & set(
        bb.run_settings()
    )
    assert {f.name for f in fields(cls.Settings)} >= {
        "teacher_steps",
        "teacher_guidance",
        "eval_batch",
    }


def test_settings_unknown_key_and_bad_value(case):
    cls = type(case.bb)
    with pytest.raises(UserError, match="did you mean 'backbone.teacher_steps'"):
        cls(settings={"teacher_stepz": 3})
    with pytest.raises(UserError, match="backbone.teacher_steps"):
        cls(settings={"teacher_steps": "many"})
    with pytest.raises(UserError, match="backbone.eval_batch"):
        cls.make_settings(eval_batch="0")
    assert cls.make_settings(teacher_steps="3").teacher_steps == 3  # text from --set is coerced


def test_generation_settings_are_json(case):
    gs = case.bb.generation_settings()
    assert json.loads(json.dumps(gs)) == gs and gs["name"] == case.bb.name


def test_third_party_backbone_is_found_by_entry_point(plugin_registry):
    assert "ring" in plugin_registry.names()
    assert plugin_registry.describe("ring").startswith("plugin from cdmb_test_ring")
    bb = plugin_registry.get("ring")(settings={"width": "8"})
    assert bb.settings.width == 8 and bb.run_settings()["width"] == 8
    assert "eval_metrics" not in bb.run_settings()  # an eval default overridden plainly


# ------------------------------------------------------------- the diffusers families
DIFFUSERS = [
    ("tiny-sd3", "sd3", "stabilityai/stable-diffusion-3-medium-diffusers", "CDMBENCH_SD3"),
    ("tiny-longcat", "longcat", "meituan-longcat/LongCat-Image", "CDMBENCH_LONGCAT"),
]


@pytest.mark.parametrize("tiny,real,hub,env", DIFFUSERS, ids=["sd3", "longcat"])
def test_channels_last_vae_decodes_the_same(tiny, real, hub, env):
    """The VAE in channels-last memory format (the default on CUDA) decodes as before."""
    bb = get_backbone(tiny)
    z = flow.seeded_noise(bb.latent_shape, [0, 1])
    ref = bb.decode(z)
    nhwc = get_backbone(tiny, settings={"seed": bb.settings.seed})
    nhwc.channels_last = True
    conv = next(m for m in nhwc.component("vae").modules() if isinstance(m, torch.nn.Conv2d))
    assert (
        conv.weight.is_contiguous(memory_format=torch.channels_last) and not bb.use_channels_last()
    )
    assert (nhwc.decode(z) - ref).abs().max() <= 1e-5


def _one_line(fn) -> str:
    t0 = time.perf_counter()
    with pytest.raises(MissingWeightsError) as e:
        fn()
    assert time.perf_counter() - t0 < 5
    assert isinstance(e.value, UserError) and isinstance(e.value, FileNotFoundError)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("tiny,real,hub,env", DIFFUSERS, ids=["sd3", "longcat"])
def test_missing_weights_fail_in_one_line(tiny, real, hub, env, tmp_path, monkeypatch):
    msg = _one_line(lambda: get_backbone(real, settings={"weights": "/nonexistent"}))
    assert "/nonexistent" in msg and f"`hf download {hub}`" in msg
    monkeypatch.setenv(env, str(tmp_path / "missing"))
    assert "missing" in _one_line(lambda: get_backbone(real))
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "vae").mkdir()
    assert "transformer/" in _one_line(lambda: get_backbone(real, weights=tmp_path).load_teacher())


@pytest.mark.parametrize("tiny,real,hub,env", DIFFUSERS, ids=["sd3", "longcat"])
def test_missing_hub_weights_offline_fail_fast(tiny, real, hub, env, tmp_path, monkeypatch):
    """A hub id that is not cached, with the hub offline: one line, without waiting."""
    import huggingface_hub.constants as hf

    monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    msg = _one_line(
        lambda: get_backbone(real, weights="cdmbench-tests/no-such-model").load_teacher()
    )
    assert "`hf download cdmbench-tests/no-such-model`" in msg
    assert f"`hf download {hub}`" in _one_line(
        lambda: get_backbone(real).load_teacher()
    )  # the default


@pytest.mark.parametrize("tiny", ["tiny-sd3", "tiny-longcat"])
def test_weights_identity_in_the_run_hash(tiny, tmp_path):
    """A local folder is identified by its listing: another model there is another run."""
    from cdmbench.backbones.base import weights_fingerprint

    bb = get_backbone(tiny)
    bb.pipeline(bb.load_teacher()).save_pretrained(tmp_path / "a")
    real = get_backbone(tiny, weights=tmp_path / "a")
    first = real.teacher_id()
    assert first.startswith("folder:") and first == weights_fingerprint(tmp_path / "a")
    assert real.teacher_id(str(tmp_path / "a" / "transformer")).startswith("folder:")
    f = next((tmp_path / "a" / "transformer").glob("*.safetensors"))
    f.write_bytes(f.read_bytes() + b" ")
    assert get_backbone(tiny, weights=tmp_path / "a").teacher_id() != first
