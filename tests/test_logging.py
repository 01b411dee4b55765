"""Training logs: trackers, periodic sample grids, bounded grids."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cdmbench.backbones import get_backbone
from cdmbench.config import resolve, run_payload
from cdmbench.errors import UserError
from cdmbench.generate import MAX_CELL, MAX_GRID_PIXELS, grid_cell_scale, save_grid
from cdmbench.registry import METHODS
from cdmbench.training.core import TrainConfig
from cdmbench.training.logging import SAMPLE_CELL
from cdmbench.training.run import STUDENT_FILE, train_run


def digits_run(tmp_path, sets, iters=3):
    cls = METHODS.get("cdm")
    train_cfg, method_cfg = resolve(cls, "digits", None, sets, iters=iters, batch=16)
    res = train_run(cls(method_cfg), get_backbone("digits"), train_cfg, tmp_path, sample_steps=(1,))
    return res.run_dir


# ------------------------------------------------------------------------------ settings
def test_logging_settings_do_not_change_a_runs_identity():
    cls = METHODS.get("cdm")
    bb = get_backbone("digits")
    plain, cfg = resolve(cls, "digits", None, [])
    logged, _ = resolve(cls, "digits", None, ["train.log_to=none", "train.sample_every=5"])
    assert (logged.log_to, logged.sample_every) == ("none", 5)
    assert run_payload("cdm", bb, plain, cfg) == run_payload("cdm", bb, logged, cfg)
    with pytest.raises(UserError, match="log_to"):
        resolve(cls, "digits", None, ["train.log_to=mlflow"])
    with pytest.raises(UserError, match="sample_every"):
        TrainConfig(sample_every=-1)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_asked_for_but_missing_is_one_line_before_the_run(tmp_path, capsys):
    from cdmbench.cli import main

    args = ["train", "cdm", "--iters", "1", "--out", str(tmp_path), "--set", "train.log_to=wandb"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and "pip install wandb" in err
    assert not any(tmp_path.iterdir())  # nothing started


# ------------------------------------------------------------------------- sample grids
def test_sample_grids_at_a_cadence_leave_training_unchanged(tmp_path):
    quiet = digits_run(tmp_path / "a", ["train.log_to=none"])
    sampled = digits_run(tmp_path / "b", ["train.log_to=none", "train.sample_every=2"])
    assert quiet.name == sampled.name  # the same run
    assert (quiet / STUDENT_FILE).read_bytes() == (sampled / STUDENT_FILE).read_bytes()
    assert not (quiet / "samples").exists()
    assert [p.name for p in (sampled / "samples").iterdir()] == ["it-00000002.png"]
    img = Image.open(sampled / "samples" / "it-00000002.png")
    # 8 digits x (1, 4) steps, 8 px cells scaled up 4x to 32 px (within the cell bound)
    assert img.size == (8 * (32 + 4) + 4, 2 * (32 + 4) + 4)
    log = [json.loads(line) for line in (sampled / "log.jsonl").read_text().splitlines()]
    assert log[-1]["it"] == 3


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="no tensorboard")
def test_tensorboard_gets_scalars_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = digits_run(tmp_path, ["train.log_every=1", "train.sample_every=3"])
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert "student/grad_norm" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("student/grad_norm")] == [1, 2, 3]
    assert [e.step for e in acc.Images("samples")] == [3]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="no wandb")
def test_wandb_offline_records_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = digits_run(tmp_path, ["train.log_to=wandb", "train.log_every=1"])
    assert list((run / "wandb").glob("offline-run-*"))
    assert not (run / "tb").exists()


# ------------------------------------------------------------------------ bounded grids
def test_grid_cells_are_bounded():
    assert grid_cell_scale(8, 8, 30, scale=4) == 4  # digits: unchanged
    assert grid_cell_scale(64, 64, 30, scale=4) == 4  # 256 px cells
    assert grid_cell_scale(128, 128, 30, scale=4) == 2
    assert grid_cell_scale(1024, 1024, 30, scale=4) == MAX_CELL / 1024
    f = grid_cell_scale(1024, 1024, 2400, scale=6)  # `cdmbench sample` on 300 prompts
    assert 2400 * (1024 * f) ** 2 <= MAX_GRID_PIXELS
    assert grid_cell_scale(8, 8, 16, scale=4, max_cell=SAMPLE_CELL) == 4


def test_grid_of_large_images_is_downscaled(tmp_path):
    images = torch.rand(6, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    save_grid(images, tmp_path / "g.png", nrow=3, scale=4)
    img = Image.open(tmp_path / "g.png")
    assert img.size == (3 * (256 + 1) + 1, 2 * (256 + 1) + 1)
    mean = np.asarray(img, dtype=np.float64).mean() / 255
    assert abs(mean - 0.5) < 0.02  # downscaled, not cropped or blanked


def test_digits_grid_bytes_unchanged(tmp_path):
    """The 8x8 digits grid (4x nearest-neighbour cells) as the unbounded code wrote it."""
    images = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    save_grid(images, tmp_path / "d.png", nrow=10, scale=4)
    x = torch.nn.functional.interpolate(images, scale_factor=4, mode="nearest")
    canvas = torch.ones(1, 3 * 36 + 4, 10 * 36 + 4)
    for k in range(30):
        r, q = divmod(k, 10)
        canvas[:, 4 + r * 36 : 4 + r * 36 + 32, 4 + q * 36 : 4 + q * 36 + 32] = x[k]
    arr = (canvas[0].numpy() * 255).round().astype("uint8")
    Image.fromarray(arr, mode="L").save(tmp_path / "ref.png", format="PNG")
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("d.png", "ref.png")]
    assert digest[0] == digest[1]
