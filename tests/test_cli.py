"""The command line: help, listings, and every user error -> one line on stderr, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdmbench.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_help_lists_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for cmd in ("list", "train", "eval", "report", "check", "bench", "sample", "teacher"):
        assert cmd in out


@pytest.mark.parametrize("what,names", [("methods", ["cdm", "dmd", "dmd2", "cd"]), ("backbones", ["digits"]),
                                         ("metrics", ["fd_digits", "prompt_acc", "latency"])])
def test_list(capsys, what, names):
    code, out, _ = run(capsys, "list", what)
    assert code == 0
    for n in names:
        assert n in out


@pytest.fixture
def corrupt_run(tmp_path) -> Path:
    d = tmp_path / "runs" / "digits" / "cdm-000000000000"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"method": "cdm", "backbone": "digits", "student_sha256": "0" * 64}))
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
        (["eval", "--backbone", "tiny-sd3", "--metrics", "fid", "--methods", "teacher"], "inception"),
        (["eval", "--backbone", "tiny-sd3", "--metrics", "clip_score", "--methods", "teacher"], "ViT-L-14"),
        (["eval", "--backbone", "tiny-sd3", "--metrics", "image_reward", "--methods", "teacher"],
         "ImageReward"),
        (["eval", "--metrics", "fd_digits", "--methods", "teacher", "--results", str(ro / "sub")],
         "not writable"),
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


def test_debug_shows_traceback(capsys):
    with pytest.raises(Exception, match="unknown method"):
        main(["--debug", "train", "cmd"])
