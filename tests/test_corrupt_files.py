"""Corrupt and foreign files, generated: a finished run's student (its hash in run.json updated,
as a hostile user would) and run.json, a checkpoint, a sample folder's manifest and PNGs, a
baseline CSV and a prompt file, each truncated at a random offset, with random bytes flipped,
or replaced by random bytes, a pickle or JSON of the wrong shape. The CLI, run in-process on
tiny budgets, exits 0 (a damaged sample regenerated: the same metric values), or exits 2 with
one line on stderr and no traceback; either way nothing is left behind (no temporary file, no
output of a failed command). The outcome of every generated case is counted by class and
printed at the end of the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli_run import run

CASES: Counter = Counter()  # (class, corruption, outcome) -> generated cases
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
EVAL = ("eval", "--methods", "teacher", "--steps", "1", "--num-samples", "2")
EVAL += ("--metrics", "fd_digits")


@pytest.fixture(scope="module", autouse=True)
def _case_table(request):
    yield
    rows = sorted(CASES.items())
    lines = ["", "generated corrupt-file cases (class, corruption, outcome, count):"]
    lines += [f"  {c:<18} {k:<10} {o:<8} {n}" for (c, k, o), n in rows]
    lines.append(f"  total {sum(CASES.values())}")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            for line in lines:
                reporter.write_line(line)
    if os.environ.get("CDMBENCH_FUZZ_TABLE"):
        Path(os.environ["CDMBENCH_FUZZ_TABLE"]).write_text(
            json.dumps([[c, k, o, n] for (c, k, o), n in rows])
        )


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def contract(capsys, cwd: Path, *argv: str, kind: tuple[str, str], ok=(0,)) -> int:
    """Exit status of `cdmbench ARGV` in ``cwd``: one of ``ok``, or 2 with exactly one line on
    stderr; no traceback, no temporary file left; a failed command creates no file (a lock
    file excepted)."""
    before = _files(cwd)
    cur = Path.cwd()
    os.chdir(cwd)
    try:
        code, out, err = run(capsys, *argv)
    finally:
        os.chdir(cur)
    assert "Traceback" not in out + err, err
    assert code in (*ok, 2), (argv, code, err)
    if code == 2:
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (argv, err)
        new = {f for f in _files(cwd) - before if not f.endswith(".lock")}
        assert not new, (argv, err, new)
    left = [f for f in _files(cwd) if f.endswith(".tmp")]
    assert not left, (argv, code, left)
    CASES[(*kind, f"exit {code}")] += 1
    return code


# ------------------------------------------------------------------------ corruptions
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
PICKLED = st.sampled_from(
    [{"inp.weight": [0.0] * 4}, [1, 2, 3], "x", os.getpid, {"method": "cdm"}, None]
)


@st.composite
def corrupted(draw, data: bytes) -> tuple[str, bytes]:
    """(kind of corruption, the corrupted bytes of ``data``)."""
    kind = draw(st.sampled_from(["truncate", "flip", "random", "pickle", "json"]))
    if kind == "truncate":
        return kind, data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flip":
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= draw(st.integers(1, 255))
        return kind, bytes(b)
    if kind == "random":
        return kind, draw(st.binary(max_size=512))
    if kind == "pickle":
        return kind, pickle.dumps(draw(PICKLED))
    return kind, json.dumps(draw(JSON)).encode()


@st.composite
def json_edited(draw, data: bytes) -> tuple[str, bytes]:
    """A JSON object with one field deleted or given a value of a random shape; or any
    :func:`corrupted` damage."""
    if draw(st.booleans()):
        return draw(corrupted(data))
    obj = json.loads(data)
    key = draw(st.sampled_from(sorted(obj)))
    if draw(st.booleans()):
        del obj[key]
        return "field-del", json.dumps(obj).encode()
    obj[key] = draw(JSON)
    return "field-val", json.dumps(obj).encode()


def _rehash(run_dir: Path) -> None:
    """Make run.json's hash match the (damaged) student, as a hostile user would."""
    info = json.loads((run_dir / "run.json").read_text())
    info["student_sha256"] = hashlib.sha256((run_dir / "student.safetensors").read_bytes())
    info["student_sha256"] = info["student_sha256"].hexdigest()
    (run_dir / "run.json").write_text(json.dumps(info))


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-iteration cdm run on digits (its output root)."""
    from cdmbench.cli import main

    root = tmp_path_factory.mktemp("trained")
    with pytest.raises(SystemExit) as e:
        main(["train", "cdm", "--iters", "2", "--device", "cpu", "--out", str(root / "runs")])
        raise SystemExit(0)
    assert e.value.code in (0, None)
    return root


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """A folder with the samples and results of a tiny digits eval and a baseline of them."""
    from cdmbench.cli import main

    root = tmp_path_factory.mktemp("evaluated")
    cur = Path.cwd()
    os.chdir(root)
    try:
        for argv in (
            [*EVAL, "--samples", "samples", "--results", "results"],
            ["check", "--write-baseline", "--baseline", "baseline.csv", "--results", "results"],
        ):
            with pytest.raises(SystemExit) as e:
                main(argv)
                raise SystemExit(0)
            assert e.value.code in (0, None)
    finally:
        os.chdir(cur)
    return root


_COPIES: dict[str, Path] = {}  # the newest copy of each name


def _copy(src: Path, tmp_path_factory, name: str) -> Path:
    """A fresh copy of ``src`` for one example; the previous example's copy of the same name
    is removed (each is a whole run; a failing example, replayed last, keeps its own)."""
    old = _COPIES.pop(name, None)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    dst = _COPIES[name] = tmp_path_factory.mktemp(name)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def _run_dir(root: Path) -> Path:
    return next((root / "runs" / "digits").glob("cdm-*"))


def _values(results: Path) -> list[tuple]:
    recs = [json.loads(x) for x in (results / "records.jsonl").read_text().splitlines()]
    return sorted((r["method"], r["steps"], r["metric"], r["value"]) for r in recs)


# ------------------------------------------------------------------------------ runs
@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_corrupt_student(capsys, tmp_path_factory, trained, data):
    root = _copy(trained, tmp_path_factory, "student")
    run_dir = _run_dir(root)
    path = run_dir / "student.safetensors"
    kind, bad = data.draw(corrupted(path.read_bytes()))
    path.write_bytes(bad)
    _rehash(run_dir)
    argv = ("sample", "--run", str(run_dir), "--steps", "1", "--out", "g.png")
    if contract(capsys, root, *argv, kind=("student", kind)) == 2:
        assert not (root / "g.png").exists()


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_corrupt_run_json(capsys, tmp_path_factory, trained, data):
    root = _copy(trained, tmp_path_factory, "runjson")
    path = _run_dir(root) / "run.json"
    kind, bad = data.draw(json_edited(path.read_bytes()))
    path.write_bytes(bad)
    argv = ("sample", "--run", str(_run_dir(root)), "--steps", "1", "--out", "g.png")
    if contract(capsys, root, *argv, kind=("run.json", kind)) == 2:
        assert not (root / "g.png").exists()


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_corrupt_checkpoint(capsys, tmp_path_factory, trained, data):
    """A damaged checkpoint file (its hash in the manifest updated, or not) or manifest, in a
    run to be resumed: resumed, retrained or refused in one line."""
    root = _copy(trained, tmp_path_factory, "ckpt")
    run_dir = _run_dir(root)
    (run_dir / "run.json").unlink()
    (run_dir / "student.safetensors").unlink()
    ckpt = run_dir / "checkpoint"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    target = data.draw(st.sampled_from(sorted(p.name for p in ckpt.iterdir())))
    if target == "manifest.json":
        kind, bad = data.draw(json_edited((ckpt / target).read_bytes()))
        (ckpt / target).write_bytes(bad)
    else:
        kind, bad = data.draw(corrupted((ckpt / target).read_bytes()))
        (ckpt / target).write_bytes(bad)
        if data.draw(st.booleans()):
            manifest["sha256"][target] = hashlib.sha256(bad).hexdigest()
            (ckpt / "manifest.json").write_text(json.dumps(manifest))
    argv = ("train", "cdm", "--iters", "2", "--device", "cpu", "--out", "runs")
    code = contract(capsys, root, *argv, kind=("checkpoint", kind))
    assert (run_dir / "student.safetensors").exists() == (code == 0)


# --------------------------------------------------------------------------- samples
@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_corrupt_sample_folder(capsys, tmp_path_factory, evaluated, data):
    """A damaged manifest line or PNG: regenerated (the same metric values as the clean
    folder) or refused in one line."""
    root = _copy(evaluated, tmp_path_factory, "samples")
    shutil.rmtree(root / "results")
    folder = next(p for p in (root / "samples").rglob("*-1-*") if p.is_dir())
    pngs = sorted(p.name for p in folder.glob("*.png"))
    target = data.draw(st.sampled_from(["manifest.jsonl", *pngs[:1]]) | st.sampled_from(pngs))
    path = folder / target
    if target == "manifest.jsonl":
        lines = path.read_bytes().splitlines(keepends=True)
        i = data.draw(st.integers(0, len(lines) - 1))
        kind, bad = data.draw(json_edited(lines[i].strip()))
        lines[i] = bad + b"\n"
        path.write_bytes(b"".join(lines))
        cls = "manifest.jsonl"
    else:
        kind, bad = data.draw(corrupted(path.read_bytes()))
        path.write_bytes(bad)
        cls = "sample png"
    argv = (*EVAL, "--samples", "samples", "--results", "results")
    if contract(capsys, root, *argv, kind=(cls, kind)) == 0:
        assert _values(root / "results") == _values(evaluated / "results")


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_corrupt_baseline(capsys, tmp_path_factory, evaluated, data):
    """`check` against a damaged baseline: passes, finds a regression (exit 1), or says what
    is wrong with the file in one line."""
    root = _copy(evaluated, tmp_path_factory, "baseline")
    path = root / "baseline.csv"
    kind, bad = data.draw(corrupted(path.read_bytes()))
    path.write_bytes(bad)
    argv = ("check", "--baseline", "baseline.csv", "--results", "results")
    contract(capsys, root, *argv, kind=("baseline csv", kind), ok=(0, 1))


@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_corrupt_prompt_file(capsys, tmp_path_factory, data):
    root = tmp_path_factory.mktemp("prompts")
    good = b"a handwritten digit seven\ndigit 3\n"
    kind, bad = data.draw(corrupted(good))
    (root / "my_prompts.txt").write_bytes(bad)
    argv = (*EVAL, "--prompts", "my_prompts.txt", "--samples", "samples", "--results", "results")
    contract(capsys, root, *argv, kind=("prompt file", kind))
