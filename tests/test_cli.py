"""The command line: help, listings, and every user error -> one line on stderr, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_run import run

from cdmbench.cli import main


def test_help_lists_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for cmd in ("list", "train", "eval", "report", "check", "bench", "sample", "teacher"):
        assert cmd in out


@pytest.mark.parametrize(
    "what,names",
    [
        ("methods", ["cdm", "dmd", "dmd2", "cd"]),
        ("backbones", ["digits"]),
        ("metrics", ["fd_digits", "prompt_acc", "latency"]),
    ],
)
def test_list(capsys, what, names):
    code, out, _ = run(capsys, "list", what)
    assert code == 0
    for n in names:
        assert n in out


@pytest.fixture
def corrupt_run(tmp_path) -> Path:
    d = tmp_path / "runs" / "digits" / "cdm-000000000000"
    d.mkdir(parents=True)
    (d / "run.json").write_text(
        json.dumps({"method": "cdm", "backbone": "digits", "student_sha256": "0" * 64})
    )
    (d / "student.safetensors").write_bytes(b"not a safetensors file")
    return d


def bad_inputs(tmp: Path, corrupt: Path) -> list[tuple[list[str], str]]:
    """(argv, a fragment the one-line message must contain)."""
    empty = tmp / "empty.txt"
    empty.write_text("\n# only a comment\n")
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{not json\n')
    bad_toml = tmp / "bad.toml"
    bad_toml.write_text("[train\niters = 3")
    base = tmp / "base.csv"
    base.write_text("no,such,columns\n1,2,3\n")
    ro = tmp / "a-file"
    ro.write_text("not a directory")
    return [
        (["train", "cmd"], "did you mean 'cdm'"),
        (["train", "dmd3"], "unknown method"),
        (["train", "cdm", "--backbone", "digts"], "did you mean 'digits'"),
        (["train", "cdm", "--set", "method.nmax=3"], "did you mean 'method.n_max'"),
        (["train", "cdm", "--set", "iters"], "use key=value"),
        (["train", "cdm", "--set", "train.iters=abc"], "bad value"),
        (["train", "cdm", "--set", "foo.bar=1"], "unknown section"),
        (
            ["train", "cdm", "--backbone", "tiny-sd3", "--set", "backbone.resolutoin=64"],
            "did you mean 'backbone.resolution'",
        ),
        (["train", "cdm", "--set", "backbone.teacher_steps=lots"], "backbone.teacher_steps"),
        (
            ["train", "cdm", "--backbone", "tiny-sd3", "--set", "backbone.resolution=100"],
            "multiple of 16",
        ),
        (
            ["train", "cdm", "--backbone", "tiny-sd3", "--set", "backbone.dtype=float8"],
            "use one of",
        ),
        (["eval", "--set", "train.iters=3"], "only backbone.KEY"),
        (["eval", "--set", "backbone.eval_bach=3"], "did you mean 'backbone.eval_batch'"),
        (["sample", "--set", "backbone.teacher_stps=3"], "did you mean 'backbone.teacher_steps'"),
        (
            ["sample", "--run", str(corrupt), "--set", "backbone.teacher_steps=3"],
            "--set with --run",
        ),
        (["bench", "--set", "method.n_max=3"], "only backbone.KEY"),
        (["teacher", "--backbone", "tiny-sd3"], "pretrained teacher"),
        (["train", "cdm", "--config", str(tmp / "missing.toml")], "not found"),
        (["train", "cdm", "--config", str(bad_toml)], "not valid TOML"),
        (["train", "cdm", "--on-nan", "ignore"], "--on-nan"),
        (["train", "cdm", "--teacher-weights", str(tmp / "none.safetensors")], "not found"),
        (["train", "cdm", "--resume", "--out", str(tmp / "fresh")], "nothing to resume"),
        (["eval", "--steps", "0"], ">= 1"),
        (["eval", "--steps", "-1"], ">= 1"),
        (["eval", "--steps", "a"], "not an integer"),
        (["eval", "--steps", "1,,2"], "bad step list"),
        (["eval", "--steps", "1,2,1"], "duplicate"),
        (["eval", "--steps", ""], "bad step list"),
        (["eval", "--metrics", "fid_digits"], "did you mean 'fd_digits'"),
        (["eval", "--methods", "cmd"], "did you mean 'cdm'"),
        (["eval", "--methods", "dmd2", "--runs", str(tmp / "noruns")], "no finished run"),
        (["eval", "--prompts", str(tmp / "nope.txt"), "--metrics", "prompt_acc"], "nope.txt"),
        (["eval", "--prompts", str(empty), "--metrics", "prompt_acc"], "empty"),
        (["eval", "--prompts", str(bad_json), "--metrics", "prompt_acc"], "bad.jsonl"),
        (["eval", "--backbone", "sd4"], "unknown backbone"),
        (["eval", "--compile", "--compile-mode", "fastest"], "--compile-mode"),
        (["eval", "--metrics", "fd_digits", "--recompute", "latency"], "add it to --metrics"),
        (["eval", "--recompute", "latncy"], "did you mean 'latency'"),
        (["bench", "--compile-mode", "max"], "--compile-mode"),
        (["sample", "--run", str(corrupt)], "corrupt"),
        (["sample", "--run", str(tmp / "not-a-run")], "not a finished training run"),
        (["sample", "--steps", "2,x"], "not an integer"),
        (["list", "metods"], "did you mean 'methods'"),
        (["report", "--results", str(tmp / "no-results")], ""),
        (["check", "--baseline", str(tmp / "none.csv")], "not found"),
        (["check", "--baseline", str(base), "--results", str(tmp)], str(base.name)),
        (["check", "--baseline", str(base), "--tolerance", "fd_digits"], "METRIC=VALUE"),
        (["teacher", "--backbone", "sd3x"], "unknown backbone"),
        (["bench", "--methods", "cdm,cmd"], "did you mean 'cdm'"),
        (
            ["eval", "--backbone", "tiny-sd3", "--metrics", "fid", "--methods", "teacher"],
            "inception",
        ),
        (
            ["eval", "--backbone", "tiny-sd3", "--metrics", "clip_score", "--methods", "teacher"],
            "ViT-L-14",
        ),
        (
            ["eval", "--backbone", "tiny-sd3", "--metrics", "image_reward", "--methods", "teacher"],
            "ImageReward",
        ),
        (
            [
                "eval",
                "--metrics",
                "fd_digits",
                "--methods",
                "teacher",
                "--results",
                str(ro / "sub"),
            ],
            "not writable",
        ),
    ]


def test_bad_inputs_exit_2_with_one_line(tmp_path, corrupt_run, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = bad_inputs(tmp_path, corrupt_run)
    assert len(cases) >= 25
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    table = []
    for argv, fragment in cases:
        code, out, err = run(capsys, *argv)
        lines = [x for x in err.strip().splitlines() if x.strip()]
        table.append((argv, code, lines))
        assert code == 2, f"{argv}: exit {code}, stderr {err!r}"
        assert len(lines) == 1 and lines[0].startswith("error:"), f"{argv}: {err!r}"
        assert fragment in lines[0], f"{argv}: {lines[0]!r} lacks {fragment!r}"
        assert "Traceback" not in err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before  # nothing written, nothing lost


def _run_dirs(root: Path) -> set[Path]:
    return set(root.glob("tiny-sd3/cdm-*"))


def test_backbone_settings_reach_the_run_and_its_hash(tmp_path, capsys):
    """`--set backbone.KEY=VALUE` and TOML [backbone] configure the backbone; the settings
    that change results are part of the run's identity, the others only its provenance, and
    `load_run` rebuilds the backbone with them."""
    from cdmbench.training.run import load_run

    runs = tmp_path / "runs"
    base = [
        "train",
        "cdm",
        "--backbone",
        "tiny-sd3",
        "--iters",
        "2",
        "--batch",
        "2",
        "--out",
        str(runs),
        "--set",
        "method.n_max=2",
    ]
    code, _, err = run(
        capsys,
        *base,
        "--set",
        "backbone.gradient_checkpointing=true",
        "--set",
        "backbone.resolution=64",
    )
    assert code == 0, err
    (with_settings,) = _run_dirs(runs)
    info = json.loads((with_settings / "run.json").read_text())
    assert info["backbone_settings_used"]["gradient_checkpointing"] is True
    assert "gradient_checkpointing" not in info["backbone_settings"]  # the same gradients
    assert info["backbone_settings"]["resolution"] == 64
    assert info["teacher"] == "tiny-sd3-default"
    code, out, err = run(capsys, *base)  # 64 px is tiny-sd3's default: the same computation
    assert code == 0, err
    assert "already trained" in out and _run_dirs(runs) == {with_settings}

    code, _, err = run(capsys, *base, "--set", "backbone.resolution=32")
    assert code == 0, err
    assert len(_run_dirs(runs)) == 2  # another resolution: another run directory

    cfg = tmp_path / "run.toml"
    cfg.write_text("[backbone]\nresolution = 128\n")
    code, _, err = run(capsys, *base, "--config", str(cfg))
    assert code == 0, err
    (big,) = [
        d
        for d in _run_dirs(runs)
        if json.loads((d / "run.json").read_text())["backbone_settings"]["resolution"] == 128
    ]
    loaded = load_run(big)
    assert loaded.backbone.settings.resolution == 128 and loaded.backbone.latent_shape == (
        16,
        16,
        16,
    )
    assert load_run(with_settings).backbone.latent_shape == (16, 8, 8)

    # eval finds the run trained with the backbone settings it is given, and only that one
    code, out, err = run(
        capsys,
        "eval",
        "--backbone",
        "tiny-sd3",
        "--runs",
        str(runs),
        "--methods",
        "cdm",
        "--metrics",
        "latency",
        "--steps",
        "1",
        "--num-samples",
        "1",
        "--samples",
        str(tmp_path / "samples"),
        "--results",
        str(tmp_path / "results"),
        "--prompts",
        str(_two_prompts(tmp_path)),
        "--set",
        "backbone.resolution=128",
    )
    assert code == 0, err
    recs = [
        json.loads(line)
        for line in (tmp_path / "results" / "records.jsonl").read_text().splitlines()
    ]
    assert {r["run_id"] for r in recs} == {big.name}


def _two_prompts(tmp: Path) -> Path:
    p = tmp / "two.txt"
    p.write_text("a red bicycle\na lighthouse at dusk\n")
    return p


def test_debug_shows_traceback(capsys):
    with pytest.raises(Exception, match="unknown method"):
        main(["--debug", "train", "cmd"])


@pytest.mark.parametrize(
    "argv",
    [
        ("train", "cdm", "--iters", "2.5"),
        ("train", "cdm", "--batch", "many"),
        ("evl",),
        ("eval", "--no-such-option"),
        ("report", "--format"),
    ],
)
def test_command_line_parse_errors_are_one_line(capsys, argv):
    from tests.cli_run import run

    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--help" in err, err
