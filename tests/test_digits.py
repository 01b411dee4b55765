"""The embedded `digits` backbone: data split, prompts, shipped networks, CFG batching, sample grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdmbench import flow
from cdmbench.backbones import digits as D
from cdmbench.backbones import get_backbone
from cdmbench.cli import main
from cdmbench.metrics.digits import DigitsJudge, quantize
from cdmbench.prompts_io import Prompt


def test_split_is_fixed_disjoint_and_stratified():
    tr, te = D.split_indices("train"), D.split_indices("test")
    assert len(tr) == 1352 and len(te) == 445
    assert not set(tr) & set(te) and len(set(tr) | set(te)) == 1797
    _, y = D._load()
    for c in range(10):
        n = (y == c).sum()
        assert (y[te] == c).sum() == n // 4  # every fourth image of each class
    x, labels = D.load_split("test")
    assert (
        x.shape == (445, 1, 8, 8) and x.min() >= -1 and x.max() <= 1 and labels.dtype == torch.long
    )
    va = D.split_indices("val")  # tuning's split: part of train, none of test
    assert set(va) < set(tr) and not set(va) & set(te)
    with pytest.raises(ValueError):
        D.split_indices("validation")


def test_prompts_map_to_classes_and_null():
    bb = get_backbone("digits")
    ps = bb.prompts()
    assert [p.text for p in ps][7] == "a handwritten digit seven" and [p.id for p in ps][
        3
    ] == "digit-3"
    cond = bb.encode(
        [Prompt("a", "a handwritten digit nine"), Prompt("b", ""), Prompt("c", "digit 4")]
    )
    assert cond.tensors["label"].tolist() == [9, D.NULL_CLASS, 4]
    assert cond.null["label"].tolist() == [D.NULL_CLASS]
    with pytest.raises(ValueError, match="names no digit"):
        bb.encode([Prompt("x", "a cat")])


def test_shipped_classifier_accuracy_and_teacher_loads():
    bb = get_backbone("digits")
    assert D.classifier_accuracy(bb.load_classifier(), "test") >= 0.97
    teacher = bb.load_teacher()
    assert not any(p.requires_grad for p in teacher.parameters())
    assert sum(p.numel() for p in teacher.parameters()) > 1_000_000


def test_cfg_is_one_batched_call_equal_to_two_calls():
    bb = get_backbone("digits")
    t = bb.load_teacher()
    calls = []
    h = t.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = torch.randn(5, 1, 8, 8)
    s = torch.full((5,), 0.7)
    cond = bb.encode(bb.prompts()[:5])
    v = bb.velocity(t, x, s, cond, guidance=2.5)
    h.remove()
    assert calls == [10]
    v_c = t(x, flow.timestep(s), cond.tensors["label"])
    v_u = t(x, flow.timestep(s), torch.full((5,), D.NULL_CLASS))
    torch.testing.assert_close(v, v_u + 2.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb.velocity(t, x, s, cond, 1.0), v_c, rtol=0, atol=0)


def test_teacher_training_is_reproducible():
    a = D.train_teacher(D.TeacherConfig(iters=3, batch=16))
    b = D.train_teacher(D.TeacherConfig(iters=3, batch=16))
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), k


def test_teacher_beats_one_step_at_fifty_steps():
    bb = get_backbone("digits")
    judge = DigitsJudge(bb)
    t = bb.load_teacher()
    ps = [p for p in bb.prompts() for _ in range(20)]
    seeds = [flow.sample_seed(0, p.id, i) for i, p in enumerate(ps)]
    noise = flow.seeded_noise(bb.latent_shape, seeds)
    cond = bb.encode(ps)
    labels = torch.tensor([p.label for p in ps])
    scores = {}
    for n in (1, 20):
        with torch.no_grad():
            x = flow.sample(
                lambda x, s: bb.velocity(t, x, s, cond, 1.0), noise, flow.uniform_schedule(n)
            )
        scores[n] = judge.score(bb.decode(x), labels)
    assert scores[20]["prompt_acc"] >= 0.9
    assert scores[20]["fd_digits"] < 0.5 * scores[1]["fd_digits"]


def test_quantize_matches_png_levels():
    x = torch.rand(4, 1, 8, 8)
    q = quantize(x)
    levels = ((q + 1) * 127.5).round()
    assert torch.allclose((q + 1) * 127.5, levels, atol=1e-4) and levels.max() <= 255


def test_digits_settings_are_its_evaluation_defaults():
    s = get_backbone("digits").settings
    assert (s.eval_batch, s.eval_samples, s.eval_samples_quick, s.eval_prompts) == (
        256,
        200,
        50,
        "digits",
    )
    assert s.eval_metrics == (
        "fd_digits",
        "prompt_acc",
        "precision_recall",
        "class_recall",
        "latency",
    )
    assert (s.teacher_steps, s.teacher_guidance) == (50, 2.0)
    assert get_backbone("digits").trains_teacher and not get_backbone("tiny-sd3").trains_teacher


def test_sample_command_writes_grid(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    try:
        main(["sample", "--steps", "1,4", "--per-prompt", "1", "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)
    img = np.asarray(Image.open(out))
    assert img.ndim == 2 and img.shape[1] > img.shape[0]  # 10 columns, 2 rows
    assert "wrote" in capsys.readouterr().out
