"""The error boundary: a user's corrupt, foreign or unwritable files are one line and exit 2,
never a traceback; damaged sample PNGs are regenerated; tables are whole without a terminal."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from cli_run import run
from safetensors.torch import save_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A finished 3-iteration cdm run on digits."""
    from cdmbench.cli import main

    root = tmp_path_factory.mktemp("runs")
    with pytest.raises(SystemExit) as e:
        main(["train", "cdm", "--iters", "3", "--out", str(root), "--device", "cpu"])
        raise SystemExit(0)
    assert e.value.code in (0, None)
    return root


def _run_dir(runs: Path) -> Path:
    return next((runs / "digits").glob("cdm-*"))


def _copy_run(runs: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(_run_dir(runs), dst)
    return dst


def _rehash(run: Path) -> None:
    """Make run.json's hash match the (damaged) student, as a careless copy would."""
    info = json.loads((run / "run.json").read_text())
    info["student_sha256"] = hashlib.sha256((run / "student.safetensors").read_bytes()).hexdigest()
    (run / "run.json").write_text(json.dumps(info))


def _truncate(run: Path) -> None:
    p = run / "student.safetensors"
    p.write_bytes(p.read_bytes()[:500])
    _rehash(run)


def _pickled(run: Path) -> None:
    (run / "student.safetensors").write_bytes(pickle.dumps({"w": torch.zeros(2)}))
    _rehash(run)


def _wrong_keys(run: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(run / "student.safetensors"))
    _rehash(run)


def _bad_json(run: Path) -> None:
    (run / "run.json").write_text('{"method": "cdm"')


def _json_list(run: Path) -> None:
    (run / "run.json").write_text("[1, 2]")


def _bad_method_config(run: Path) -> None:
    info = json.loads((run / "run.json").read_text())
    info["method_config"] = {"no_such_field": 1}
    (run / "run.json").write_text(json.dumps(info))


def _no_updates(run: Path) -> None:
    info = json.loads((run / "run.json").read_text())
    info["iters"] = 0
    (run / "run.json").write_text(json.dumps(info))


@pytest.mark.parametrize(
    "damage",
    [_truncate, _pickled, _wrong_keys, _bad_json, _json_list, _bad_method_config, _no_updates],
)
def test_corrupt_run_is_one_line(runs, tmp_path, capsys, damage):
    run_dir = _copy_run(runs, tmp_path)
    damage(run_dir)
    code, _, err = run(capsys, "sample", "--run", str(run_dir), "--out", str(tmp_path / "g.png"))
    _one_line_error(code, err)
    assert str(run_dir) in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("content", [b"junk", b""])
def test_bad_teacher_weights_is_one_line(tmp_path, capsys, content):
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(content)
    code, _, err = run(
        capsys, "sample", "--teacher-weights", str(bad), "--out", str(tmp_path / "g.png")
    )
    _one_line_error(code, err)
    assert str(bad) in err


def test_teacher_weights_of_wrong_shapes_is_one_line(tmp_path, capsys):
    bad = tmp_path / "t.safetensors"
    save_file({"inp.weight": torch.zeros(3, 3)}, str(bad))
    code, _, err = run(
        capsys, "sample", "--teacher-weights", str(bad), "--out", str(tmp_path / "g.png")
    )
    _one_line_error(code, err)
    assert "does not fit" in err


def test_foreign_checkpoint_is_refused(runs, tmp_path, capsys):
    """A checkpoint whose manifest names another configuration is refused; one from today's
    format without the settings hash still resumes."""
    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    run_dir = _run_dir(root)
    (run_dir / "run.json").unlink()
    (run_dir / "student.safetensors").unlink()
    manifest = run_dir / "checkpoint" / "manifest.json"
    m = json.loads(manifest.read_text())
    assert m["method"] == "cdm" and m["settings_hash"] == run_dir.name.split("-")[1]
    args = ("train", "cdm", "--iters", "3", "--out", str(root), "--device", "cpu")
    for key, value in (("settings_hash", "0123456789ab"), ("method", "dmd")):
        manifest.write_text(json.dumps(m | {key: value}))
        code, _, err = run(capsys, *args)
        _one_line_error(code, err)
        assert "another run" in err and value in err
        assert not (run_dir / "student.safetensors").exists()
    manifest.write_text(json.dumps({k: v for k, v in m.items() if k != "settings_hash"}))
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert (run_dir / "student.safetensors").is_file()


def test_tampered_checkpoint_is_one_line(runs, tmp_path, capsys):
    """A state file replaced by a pickle with its hash updated in the manifest."""
    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    run_dir = _run_dir(root)
    (run_dir / "run.json").unlink()
    ckpt = run_dir / "checkpoint"
    m = json.loads((ckpt / "manifest.json").read_text())
    state = ckpt / m["files"]["state"]
    state.write_bytes(pickle.dumps(os.getpid))
    m["sha256"][state.name] = hashlib.sha256(state.read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(m))
    code, _, err = run(
        capsys, "train", "cdm", "--iters", "3", "--out", str(root), "--device", "cpu"
    )
    _one_line_error(code, err)
    assert "cannot be loaded" in err


# ------------------------------------------------------------------------- output paths
def test_unwritable_outputs_are_one_line(runs, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    a_dir = tmp_path / "dir"
    a_dir.mkdir()
    run_dir = str(_run_dir(runs))
    cases = [
        ("sample", "--run", run_dir, "--steps", "1", "--out", str(a_dir)),
        ("sample", "--run", run_dir, "--steps", "1", "--out", str(a_file / "g.png")),
        (
            "check",
            "--write-baseline",
            "--results",
            str(tmp_path / "nores"),
            "--baseline",
            str(a_dir),
        ),
    ]
    for argv in cases:
        code, _, err = run(capsys, *argv)
        _one_line_error(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]
    assert list(a_dir.iterdir()) == []


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_file_size_limit_during_training_is_one_line(tmp_path):
    """`ulimit -f` (a full disk, as the process sees it) while writing checkpoints."""
    p = subprocess.run(
        [sys.executable, "-m", "cdmbench.cli", "train", "cdm", "--iters", "3", "--out",
         str(tmp_path / "runs"), "--device", "cpu"],
        env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size,
    )  # fmt: skip
    _one_line_error(p.returncode, p.stderr)
    assert "file size limit" in p.stderr
    assert not list((tmp_path / "runs").rglob("*.tmp"))


# ---------------------------------------------------------------------------- samples
def test_damaged_samples_are_regenerated(tmp_path):
    from cdmbench.backbones import get_backbone
    from cdmbench.evaluate import MANIFEST, ensure_samples, teacher_candidate

    bb = get_backbone("digits")
    cand = teacher_candidate(bb)
    prompts = bb.prompts("train")[:3]
    args = (bb, cand, 2, prompts, "digits", 0, 2, tmp_path)
    first = ensure_samples(*args)
    assert first.generated == 6
    pngs = {f: (first.folder / f).read_bytes() for f in first.files}
    recorded = [json.loads(x) for x in (first.folder / MANIFEST).read_text().splitlines()]
    assert all(e["sha256"] == hashlib.sha256(pngs[e["file"]]).hexdigest() for e in recorded)
    damaged, flipped = first.files[0], first.files[1]
    (first.folder / damaged).write_bytes(pngs[damaged][:40])  # truncated
    b = bytearray(pngs[flipped])
    b[-20] ^= 1  # same size, other content
    (first.folder / flipped).write_bytes(bytes(b))
    with pytest.warns(RuntimeWarning, match="damaged"):
        again = ensure_samples(*args)
    assert again.generated == 2
    assert {f: (again.folder / f).read_bytes() for f in again.files} == pngs
    # a hostile manifest records nothing: the PNGs are checked by decoding, then recorded
    (first.folder / MANIFEST).write_text(
        '[]\n{"file": 3}\nnot json\n{"file": "../x", "bytes": -1}\n'
    )
    (first.folder / damaged).write_bytes(pngs[damaged][:60])
    with pytest.warns(RuntimeWarning, match="damaged"):
        third = ensure_samples(*args)
    assert third.generated == 1
    assert {f: (third.folder / f).read_bytes() for f in third.files} == pngs


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb as
    far as anything that trusts the header is concerned)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda t, d: (  # noqa: E731
        struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    )
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_report_skips_huge_sample_images(tmp_path, capsys, side):
    from cdmbench.report import sample_cell

    (tmp_path / "a.png").write_bytes(_png_claiming(side, side))
    warnings: list[str] = []
    assert sample_cell(tmp_path, [{"file": "a.png"}], warnings) is None
    assert len(warnings) == 1 and "a.png" in warnings[0]


# ----------------------------------------------------------------------------- output
def test_tables_are_whole_without_a_terminal(capsys):
    code, out, _ = run(capsys, "list", "metrics")
    assert code == 0
    assert "…" not in out
    assert max(len(x) for x in out.splitlines()) > 80


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04broken zip"])
def test_corrupt_metric_weights_are_one_line(tmp_path, content):
    """A metric's torch weights file that is empty, garbage or a broken archive is a
    UserError naming the file (exit 2), not an internal error."""
    from cdmbench.errors import UserError
    from cdmbench.io import load_torch_file
    from cdmbench.metrics.diversity import IntraLPIPS

    bad = tmp_path / "weights.pth"
    bad.write_bytes(content)
    with pytest.raises(UserError, match="weights.pth"):
        load_torch_file(bad, "test weights", "fetch them again")
    with pytest.raises(UserError, match="weights.pth") as e:
        IntraLPIPS(backbone=str(bad)).load("cpu")
    assert "\n" not in str(e.value)
