"""Shipped recipes, `--config NAME|PATH`, `cdmbench recipes`, and `--device` resolution."""

from __future__ import annotations

import json

import pytest
import torch
from cli_run import run

from cdmbench.config import backbone_settings, read_toml, resolve
from cdmbench.distributed import resolve_device
from cdmbench.errors import UserError
from cdmbench.recipes import RECIPE_DIR, load, names, shipped
from cdmbench.registry import BACKBONES, METHODS

PAPER = {"cdm-sd3", "cdm-longcat", "dmd2-sd3", "cd-sd3"}


def test_shipped_recipes_resolve_to_typed_settings():
    assert PAPER <= set(names())
    for r in shipped():
        assert r.name == r.path.stem and r.version >= 1 and r.description
        cls = METHODS.get(r.method)
        settings = backbone_settings(BACKBONES.get(r.backbone), r.name)
        train, method = resolve(cls, r.backbone, r.name)
        data = read_toml(r.path)
        for k, v in data["train"].items():
            assert getattr(train, k) == v, (r.name, k)
        for k, v in data["method"].items():
            got = getattr(method, k)
            assert (list(got) if isinstance(got, tuple) else got) == v, (r.name, k)
        assert settings.gradient_checkpointing is True
        assert settings.resolution == 1024


def test_paper_recipe_values():
    train, method = resolve(METHODS.get("cdm"), "sd3", "cdm-sd3")
    assert (train.batch, train.iters, train.shard) == (16, 4000, "fsdp2")
    assert (method.student_lr, method.fake_lr, method.update_ratio) == (1e-5, 5e-6, 2)
    assert train.iters // method.update_ratio == 2000  # student updates
    train, _ = resolve(METHODS.get("cdm"), "longcat", "cdm-longcat")
    assert train.batch == 8


def test_set_overrides_a_recipe_and_paths_work(tmp_path):
    train, method = resolve(
        METHODS.get("cdm"), "sd3", "cdm-sd3", ["train.batch=4", "method.n_max=8"]
    )
    assert (train.batch, method.n_max) == (4, 8)
    settings = backbone_settings(
        BACKBONES.get("sd3"), "cdm-sd3", ["backbone.gradient_checkpointing=false"]
    )
    assert settings.gradient_checkpointing is False
    path = tmp_path / "mine.toml"
    path.write_text((RECIPE_DIR / "cdm-sd3.toml").read_text().replace('"cdm-sd3"', '"mine"'))
    assert load(str(path)).name == "mine"
    assert resolve(METHODS.get("cdm"), "sd3", str(path))[0].batch == 16


def test_recipes_command_lists_them(capsys):
    code, out, _ = run(capsys, "recipes")
    assert code == 0
    for name in PAPER:
        assert name in out


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["train", "--config", "cdm-sd4"], "did you mean 'cdm-sd3'"),
        (["train", "dmd", "--config", "cdm-sd3"], "disagrees with recipe 'cdm-sd3'"),
        (["train", "--config", "cdm-sd3", "--backbone", "digits"], "disagrees"),
        (["train"], "no method"),
        (["plan", "--config", "nope.toml"], "not found"),
        (["train", "cdm", "--device", "cuda:99", "--iters", "1"], "device"),
        (["sample", "--device", "tpu-ish"], "device"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, fragment):
    if "cuda:99" in argv and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert fragment in err
    assert len(err.strip().splitlines()) == 1


def test_resolve_device():
    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda:0"
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(UserError, match="no usable CUDA"):
            resolve_device("cuda")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("garbage")


def test_train_from_a_recipe_file_records_it_and_hashes_the_values(tmp_path, capsys):
    """A recipe on digits trains the same run (same hash) as the same values by hand, and its
    name and version land in config.json."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        '[recipe]\nname = "tiny"\nversion = 3\nmethod = "dmd2"\nbackbone = "digits"\n'
        'description = "test"\n\n[train]\niters = 2\nbatch = 8\n'
    )
    code, out, err = run(capsys, "train", "--config", str(recipe), "--out", str(tmp_path / "a"))
    assert code == 0, err
    code, _, err = run(
        capsys, "train", "dmd2", "--iters", "2", "--batch", "8", "--out", str(tmp_path / "b")
    )
    assert code == 0, err
    (a,) = (tmp_path / "a" / "digits").glob("dmd2-*")
    (b,) = (tmp_path / "b" / "digits").glob("dmd2-*")
    assert a.name == b.name
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["recipe"]["name"] == "tiny" and cfg["recipe"]["version"] == 3
    assert "recipe" not in json.loads((b / "config.json").read_text())
