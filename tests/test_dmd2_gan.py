"""DMD2 as its authors run it: the GAN head on the fake score's features (digits' own data,
an image folder on tiny-sd3), the generator-then-fake order, and their user errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from cli_run import run
from toy import Toy

from cdmbench.backbones.digits import Digits
from cdmbench.backbones.sd3 import TinySD3
from cdmbench.errors import UserError
from cdmbench.losses import gan_d_loss, gan_g_loss
from cdmbench.methods.dmd2 import DMD2, DMD2Config
from cdmbench.training.core import TrainConfig, Trainer


def _gan(**kw) -> DMD2:
    """The official options (GAN head on, generator first), at a lr that moves in a few steps."""
    base = dict(
        student_lr=1e-3, fake_lr=1e-3, warmup=0, update_ratio=2, real_guidance=1.0, gan=True
    )
    return DMD2(DMD2Config(**(base | kw)))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**(dict(iters=4, batch=16, seed=0, ckpt_every=10**9, log_every=1) | kw))


def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in tr.models.items() for k, v in m.state_dict().items()}


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_gan_losses_are_the_non_saturating_ones():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sp = torch.nn.functional.softplus
    assert torch.allclose(gan_d_loss(real, fake), sp(fake).mean() + sp(-real).mean())
    assert torch.allclose(gan_g_loss(fake), sp(-fake).mean())
    # a classifier that calls real real and fake fake has a small loss; the generator a large one
    assert gan_d_loss(torch.full((4,), 9.0), torch.full((4,), -9.0)) < 1e-3
    assert gan_g_loss(torch.full((4,), -9.0)) > 8.9


def test_digits_trains_with_the_gan_head_and_resumes_bitwise(tmp_path):
    whole = Trainer(Digits(), _gan(), _cfg(iters=5), tmp_path / "whole")
    assert set(whole.models) == {"student", "ema", "fake", "gan_head"}
    head0 = _state(whole)
    whole.train()
    logs = _log(tmp_path / "whole")
    for key in ("student/dm", "student/gan", "fake/fm", "fake/gan"):
        assert key in logs[-1] and math.isfinite(logs[-1][key]), key
    # fake/gan is 1e-2 x (softplus(-l_real) + softplus(l_fake)): 2 log 2 x 1e-2 at l = 0
    assert 0 < logs[0]["fake/gan"] < 0.05 and 0 < logs[0]["student/gan"] < 0.02
    after = _state(whole)
    moved = [k for k in head0 if k.startswith("gan_head.") and not torch.equal(head0[k], after[k])]
    assert len(moved) == len([k for k in head0 if k.startswith("gan_head.")])  # every tensor

    first = Trainer(Digits(), _gan(), _cfg(iters=3), tmp_path / "first")
    first.train()
    resumed = Trainer(Digits(), _gan(), _cfg(iters=5), tmp_path / "resumed")
    resumed.load_checkpoint(tmp_path / "first" / "checkpoint")
    assert torch.equal(
        resumed.models["gan_head"].net[0].weight, first.models["gan_head"].net[0].weight
    )
    resumed.train()
    assert resumed.updates == whole.updates == {"student": 3, "fake": 5}
    b = _state(resumed)
    assert all(torch.equal(after[k], b[k]) for k in after), [
        k for k in after if not torch.equal(after[k], b[k])
    ]


@pytest.mark.parametrize("order", ["generator_first", "fake_first"])
def test_order_decides_which_fake_score_the_generator_reads(tmp_path, order):
    """Generator first (official): every network call of a generator iteration reads the fake
    score as it was before the iteration. Fake first: the generator's calls (its DM and GAN
    terms) read the fake score after this iteration's update."""
    tr = Trainer(Digits(), _gan(order=order), _cfg(iters=1), tmp_path)
    fake = tr.models["fake"]
    seen: list[torch.Tensor] = []
    fake.register_forward_pre_hook(lambda m, a: seen.append(m.inp.weight.detach().clone()))
    before = fake.inp.weight.detach().clone()
    logs = tr.step(tr.next_batch())
    assert set(logs) >= {"student/gan", "fake/gan"}
    assert not torch.equal(fake.inp.weight, before)  # the fake score stepped
    # the student's two calls (DM term, GAN term) and the fake group's three (FM, real, fake)
    assert len(seen) == 5
    stale = [torch.equal(w, before) for w in seen]
    if order == "generator_first":
        assert stale == [True] * 5
    else:
        assert stale == [True, True, True, False, False]


def test_gan_off_builds_no_head_and_logs_no_gan_terms(tmp_path):
    tr = Trainer(Digits(), _gan(gan=False), _cfg(iters=1), tmp_path)
    assert "gan_head" not in tr.models
    assert not any(k.endswith("/gan") for k in tr.step(tr.next_batch()))


def test_a_backbone_without_feature_hook_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="backbone 'toy' has no feature hook for the GAN head"):
        Trainer(Toy(), _gan(), _cfg(), tmp_path)


def _image_folder(root, n: int = 3, size: int = 80):
    """``n`` random RGB PNGs (not the backbone's size: they are resized and cropped), the
    first with a caption."""
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size + 16 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
    (root / "img0.txt").write_text("a red square\n")
    return root


def test_tiny_sd3_trains_with_an_image_folder(tmp_path):
    folder = _image_folder(tmp_path / "real")
    bb = TinySD3()
    m = DMD2(
        replace(DMD2.default_config("tiny-sd3"), gan=True, gan_data=str(folder), update_ratio=1)
    )
    assert m.config.gan and m.config.order == "generator_first" and m.config.clip == 10.0
    tr = Trainer(bb, m, _cfg(iters=2, batch=2), tmp_path / "run")
    assert tr.models["gan_head"].net[0].in_features == bb.feature_width(tr.models["fake"])
    real, cond = m.real.batch(torch.tensor([0, 2]))
    assert real.shape == (2, *bb.latent_shape) and torch.isfinite(real).all()
    assert len(cond) == 2
    head0 = _state(tr)
    tr.train()
    logs = _log(tmp_path / "run")
    assert all(math.isfinite(logs[-1][k]) for k in ("student/gan", "fake/gan", "fake/fm"))
    after = _state(tr)
    assert not torch.equal(head0["gan_head.net.6.weight"], after["gan_head.net.6.weight"])
    # the features are differentiable in the input: the generator's GAN term reaches it
    x = torch.randn(2, *bb.latent_shape, requires_grad=True)
    f = bb.features(tr.models["fake"], x, torch.full((2,), 0.5), cond)
    assert f.shape == (2, bb.feature_width(tr.models["fake"]))
    f.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_tiny_longcat_reads_its_middle_block_across_both_stacks(tmp_path):
    """LongCat stacks double- then single-stream blocks; the head reads the middle one of all."""
    from cdmbench.backbones.longcat import TinyLongCat

    folder = _image_folder(tmp_path / "real", n=2)
    bb = TinyLongCat()
    m = DMD2(
        replace(DMD2.default_config("tiny-longcat"), gan=True, gan_data=str(folder), update_ratio=1)
    )
    tr = Trainer(bb, m, _cfg(iters=1, batch=2), tmp_path / "run")
    net = tr.models["fake"]
    stack = [*net.transformer_blocks, *net.single_transformer_blocks]
    assert bb._feature_block(net) is stack[len(stack) // 2 - 1]
    logs = tr.step(tr.next_batch())
    assert all(torch.isfinite(logs[k]) for k in ("student/gan", "fake/gan"))


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ([], "method.gan_data=FOLDER"),
        (["--set", "method.gan_data=MISSING"], "is not a folder of images"),
        (["--set", "method.gan_data=EMPTY"], "holds no images"),
    ],
)
def test_gan_without_real_images_on_sd3_is_one_line(capsys, tmp_path, extra, fragment):
    (tmp_path / "empty").mkdir()
    extra = [
        e.replace("MISSING", str(tmp_path / "nope")).replace("EMPTY", str(tmp_path / "empty"))
        for e in extra
    ]
    argv = ["train", "dmd2", "--backbone", "tiny-sd3", "--iters", "1", "--batch", "2"]
    argv += ["--set", "method.gan=true"]
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "runs"), *extra)
    assert code == 2, err
    assert fragment in err and len(err.strip().splitlines()) == 1
