"""Every input is validated at the boundary: generated option values, ``--set`` pairs, TOML
files and prompt files either work (exit 0) or fail before any work with one line on stderr
and exit 2, no traceback, nothing left behind.

The properties run on two levels: the settings layer (:func:`cdmbench.config.resolve`,
:func:`cdmbench.config.backbone_settings`), fast enough for hundreds of generated cases, and
the real CLI in-process for the cases that fail validation (they must fail before any work)
and for prompt files on a tiny evaluation budget. The outcome of every generated case is
counted by class and printed at the end of the module.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cdmbench.backbones.digits import DigitsSettings
from cdmbench.config import SECTIONS, backbone_settings, read_toml, resolve
from cdmbench.errors import UserError
from cdmbench.registry import BACKBONES, METHODS
from cdmbench.settings import validate
from cdmbench.training.core import TrainConfig
from tests.cli_run import run

CASES: Counter = Counter()  # (class, outcome) -> generated cases
FAST = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
METHOD_NAMES = ("cdm", "dmd", "dmd2", "cd")


@pytest.fixture(scope="module", autouse=True)
def _case_table(request):
    yield
    rows = sorted(CASES.items())
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["", "generated validation cases (class, outcome, count):"]
    lines += [f"  {c:<28} {o:<10} {n}" for (c, o), n in rows]
    lines.append(f"  total {sum(CASES.values())}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            for line in lines:
                reporter.write_line(line)
    if os.environ.get("CDMBENCH_FUZZ_TABLE"):
        Path(os.environ["CDMBENCH_FUZZ_TABLE"]).write_text(
            json.dumps([[c, o, n] for (c, o), n in rows])
        )


@contextmanager
def chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _one_line(message: str) -> None:
    assert message.strip(), "empty error message"
    assert "\n" not in message.strip(), message
    assert "Traceback" not in message


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def cli_contract(capsys, cwd: Path, *argv: str, kind: str) -> tuple[int, str]:
    """(exit status, stderr) of `cdmbench ARGV` run in ``cwd``: exit 0, or exit 2 with exactly
    one line on stderr, no traceback, and no file created in ``cwd``."""
    before = _files(cwd)
    with chdir(cwd):
        code, out, err = run(capsys, *argv)
    assert "Traceback" not in out + err, err
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (argv, err)
        assert _files(cwd) == before, (argv, _files(cwd) - before)
    CASES[(kind, "exit 0" if code == 0 else "exit 2")] += 1
    return code, err


# ------------------------------------------------------------------------ value strategies
def _toml_scalar():
    return st.one_of(
        st.integers(-(10**12), 10**12),
        st.integers(-3, 3),
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(0, 1),
        st.booleans(),
        st.text(max_size=12),
        st.sampled_from(["none", "cpu", "cuda:9", "stop", "skip", "random", "fixed", "ema"]),
    )


def _toml_value():
    return st.one_of(_toml_scalar(), st.lists(_toml_scalar(), max_size=4))


def _as_text(v) -> str:
    """A generated value as it is typed after ``--set KEY=``."""
    if isinstance(v, list):
        return ",".join(_as_text(x) for x in v)
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _declared() -> dict[str, object]:
    """Every declared key and its default (of one of the methods that declares it)."""
    out = {f"train.{f.name}": f.default for f in fields(TrainConfig)}
    for m in METHOD_NAMES:
        out |= {f"method.{f.name}": f.default for f in fields(METHODS.get(m).Config)}
    out |= {f"backbone.{f.name}": f.default for f in fields(DigitsSettings)}
    return out


DECLARED = _declared()
KEYS = sorted(DECLARED)


@st.composite
def near_default(draw, key: str):
    """A value of the declared default's kind near it: mostly valid, sometimes just out."""
    d = DECLARED.get(key)
    if isinstance(d, bool) or d is None or isinstance(d, str):
        return d
    if isinstance(d, int):
        a, b = max(-2, d // 2 - 2), d * 2 + 2
        return draw(st.integers(min(a, b), max(a, b)))
    if isinstance(d, float):
        a, b = d / 2 - 0.1, d * 2 + 0.1  # a negative default: d * 2 < d / 2
        return draw(st.floats(min_value=min(a, b), max_value=max(a, b)))
    if isinstance(d, tuple) and d:
        return list(d[: draw(st.integers(0, len(d)))])
    return d


@st.composite
def set_keys(draw) -> str:
    """A declared key, a bare one, a misspelt one or one in an unknown section."""
    key = draw(st.sampled_from(KEYS))
    how = draw(st.sampled_from(["as is", "as is", "as is", "bare", "typo", "section"]))
    if how == "bare":
        return key.split(".", 1)[1]
    if how == "typo":
        i = draw(st.integers(0, len(key) - 1))
        return key[:i] + key[i + 1 :]
    if how == "section":
        return draw(st.sampled_from(["trian", "methods", "bb", "x"])) + "." + key.split(".")[1]
    return key


def _resolve(method: str, config=None, sets=None):
    """Everything `train` checks before work, on the settings layer."""
    cls = METHODS.get(method)
    settings_ = backbone_settings(BACKBONES.get("digits"), config, sets)
    train, cfg = resolve(cls, "digits", config, sets)
    validate(train, "train")
    validate(cfg, "method")
    validate(settings_, "backbone")
    return train, cfg


def _outcome(kind: str, fn) -> str | None:
    """Run ``fn``: None when it passes, the one-line message of its UserError otherwise."""
    try:
        fn()
    except UserError as e:
        _one_line(str(e))
        CASES[(kind, "rejected")] += 1
        return str(e)
    CASES[(kind, "accepted")] += 1
    return None


# ------------------------------------------------------------------------- --set pairs
@FAST
@given(method=st.sampled_from(METHOD_NAMES), key=set_keys(), data=st.data())
def test_set_pairs_are_accepted_or_rejected_in_one_line(method, key, data):
    """Any --set KEY=VALUE resolves to settings that pass their declarations, or is a
    UserError naming the key; no other exception."""
    value = data.draw(st.one_of(_toml_value(), near_default(key), near_default(key)))
    text = f"{key}={_as_text(value)}"
    msg = _outcome("--set pair", lambda: _resolve(method, sets=[text]))
    if msg is not None:
        assert key.rpartition(".")[2] in msg or "section" in msg, (text, msg)


@settings(FAST, max_examples=40)
@given(key=set_keys(), value=_toml_value())
def test_rejected_set_pairs_fail_before_any_work(capsys, tmp_path_factory, key, value):
    text = f"{key}={_as_text(value)}"
    assume(_outcome("--set pair (check)", lambda: _resolve("cdm", sets=[text])) is not None)
    cwd = tmp_path_factory.mktemp("set")
    assert cli_contract(capsys, cwd, "train", "cdm", "--set", text, kind="--set pair CLI")[0] == 2


# --------------------------------------------------------------------- command-line options
INT_OPTIONS = [  # (command line before the option, option)
    (("train", "cdm"), "--iters"),
    (("train", "cdm"), "--batch"),
    (("train", "cdm"), "--seed"),
    (("eval",), "--num-samples"),
    (("eval",), "--batch-size"),
    (("eval",), "--seed"),
    (("eval",), "--limit"),
    (("eval",), "--n-ref"),
    (("bench",), "--iters"),
    (("bench",), "--workers"),
    (("bench",), "--num-samples"),
    (("sample",), "--per-prompt"),
    (("teacher",), "--epochs"),
    (("report",), "--samples-per-cell"),
]
BAD_INTS = st.one_of(st.integers(-(10**15), 0), st.integers(10**11, 10**18))


@settings(FAST, max_examples=60)
@given(option=st.sampled_from(INT_OPTIONS), value=BAD_INTS)
def test_out_of_range_options_fail_before_any_work(capsys, tmp_path_factory, option, value):
    """Zeros, negatives and huge counts are rejected with the option's name (--samples-per-cell
    accepts 0: no grids; --n-ref needs 2)."""
    cmd, flag = option
    assume(not (flag in ("--samples-per-cell", "--seed") and value == 0))
    cwd = tmp_path_factory.mktemp("opt")
    code, err = cli_contract(capsys, cwd, *cmd, flag, str(value), kind=f"option {flag}")
    assert code == 2 and f"'{flag}'" in err, err


@settings(FAST, max_examples=30)
@given(
    flag=st.sampled_from(["--dist-timeout"]),
    value=st.one_of(st.floats(max_value=0), st.just(math.inf), st.just(math.nan)),
)
def test_non_finite_or_negative_seconds_fail(capsys, tmp_path_factory, flag, value):
    cwd = tmp_path_factory.mktemp("flt")
    code, err = cli_contract(capsys, cwd, "eval", flag, str(value), kind=f"option {flag}")
    assert code == 2 and f"'{flag}'" in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ("eval", "--steps", "0"),
        ("eval", "--steps", "1,1"),
        ("eval", "--steps", ""),
        ("eval", "--steps", "99999999"),
        ("sample", "--steps", "1,-2"),
        ("train", "cdm", "--device", "tpu"),
        ("train", "cdm", "--set", "train.device=cuda:99"),
        ("train", "cdm", "--on-nan", "ignore"),
        ("train", "cdm", "--set", "train.ckpt_every=0"),
        ("train", "cdm", "--set", "method.inner_lo=0.99"),  # above inner_hi
        ("train", "cdm", "--set", "method.eval_sigmas="),  # an empty schedule
        ("train", "cd", "--set", "method.edges=0,25,12"),
        ("train", "cdm", "--set", "trian.iters=5"),
        ("eval", "--compile-mode", "fastest"),
    ],
)
def test_bad_values_named_in_one_line(capsys, tmp_path, argv):
    assert cli_contract(capsys, tmp_path, *argv, kind="explicit option/--set")[0] == 2


# --------------------------------------------------------------------------- TOML files
TABLE_NAMES = st.sampled_from([*SECTIONS, "trian", "methods", "model", "recipe"])


@st.composite
def toml_docs(draw) -> bytes:
    """A TOML file: tables of declared (or misspelt) keys with random values, sometimes keys
    outside any table, sometimes bytes that are not UTF-8."""
    lines = []
    if draw(st.booleans()) and draw(st.booleans()):
        lines.append(f"{draw(st.sampled_from(['iters', 'batch', 'x']))} = 5")
    for _ in range(draw(st.integers(0, 3))):
        table = draw(TABLE_NAMES)
        lines.append(f"[{table}]")
        for _ in range(draw(st.integers(0, 3))):
            key = draw(set_keys()).rpartition(".")[2]
            if table == "recipe":
                key = draw(st.sampled_from(["name", "version", "method", "description", "x"]))
            lines.append(f"{key} = {_toml_literal(draw(_toml_value()))}")
    data = "\n".join(lines).encode()
    if draw(st.integers(0, 9)) == 0:
        data += b"\n# \xff\xfe not utf-8\n"
    return data


def _toml_literal(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_toml_literal(x) for x in v) + "]"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string, or invalid TOML (both must be handled)
    return str(v)


@settings(FAST, max_examples=200)
@given(method=st.sampled_from(METHOD_NAMES), doc=toml_docs())
def test_toml_files_are_accepted_or_rejected_in_one_line(tmp_path_factory, method, doc):
    path = tmp_path_factory.mktemp("toml") / "c.toml"
    path.write_bytes(doc)
    _outcome("TOML file", lambda: _resolve(method, config=str(path)))


@settings(FAST, max_examples=30)
@given(doc=toml_docs())
def test_rejected_toml_files_fail_before_any_work(capsys, tmp_path_factory, doc):
    cwd = tmp_path_factory.mktemp("tomlcli")
    path = cwd / "c.toml"
    path.write_bytes(doc)
    assume(_outcome("TOML file (check)", lambda: _resolve("cdm", config=str(path))) is not None)
    assert cli_contract(capsys, cwd, "train", "cdm", "--config", "c.toml", kind="TOML CLI")[0] == 2


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (b"iters = 5\n[train]\nbatch = 4\n", "outside any table; put it under [train]"),
        (b"[train]\niters = 2.5\n", "'train.iters': expected a whole number"),
        (b"[train]\niters = [1, 2]\n", "'train.iters'"),
        (b"[train]\niters = true\n", "'train.iters'"),
        (b"[train]\nema_cap = nan\n", "'train.ema_cap'"),
        (b"[trian]\niters = 5\n", "did you mean [train]?"),
        (b"[method]\nschedule = 'fast'\n", "use one of random, fixed"),
        (b"[train]\niters = 5\n\xff\n", "not UTF-8"),
        (b"[train\n", "not valid TOML"),
    ],
)
def test_toml_strictness(capsys, tmp_path, doc, needle):
    (tmp_path / "c.toml").write_bytes(doc)
    code, err = cli_contract(capsys, tmp_path, "train", "cdm", "--config", "c.toml", kind="TOML")
    assert code == 2 and needle in err, err


def test_a_directory_as_config(capsys, tmp_path):
    (tmp_path / "cfg").mkdir()
    code, err = cli_contract(capsys, tmp_path, "train", "cdm", "--config", "./cfg", kind="TOML")
    assert code == 2 and "is a directory" in err, err


def test_shipped_recipes_pass_the_strict_reader():
    from cdmbench.recipes import RECIPE_DIR, names

    for name in names():
        read_toml(RECIPE_DIR / f"{name}.toml")


def test_config_help_shows_the_table_names(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    assert "[train]" in out and "[backbone]" in out


# ------------------------------------------------------------------------- prompt files
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@st.composite
def prompt_files(draw) -> tuple[str, bytes, bool]:
    """(file name, content, whether every prompt names a digit)."""
    n = draw(st.integers(1, 3))
    lines, valid = [], True
    for _ in range(n):
        kind = draw(st.sampled_from(["word", "numeral", "other"]))
        c = draw(st.integers(0, 9))
        if kind == "word":
            lines.append(f"a handwritten digit {DIGIT_WORDS[c]}")
        elif kind == "numeral":
            lines.append(f"digit {c}")
        else:
            lines.append(draw(st.sampled_from(["a cat", "hello world", "seventy", "x"])))
            valid = False
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["", "# a comment", "   "])))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    bom = "\ufeff" if draw(st.booleans()) else ""
    suffix = draw(st.sampled_from([".txt", ".dat", ".prompts", ""]))
    return f"my_prompts{suffix}", (bom + eol.join(lines) + eol).encode(), valid


@settings(FAST, max_examples=10)
@given(spec=prompt_files())
def test_prompt_files_on_digits(capsys, tmp_path_factory, spec):
    """A plain prompt file on digits scores (its prompts labelled by the digit each names), or
    is refused before any sample is generated when a prompt names no digit."""
    name, content, valid = spec
    cwd = tmp_path_factory.mktemp("prompts")
    (cwd / name).write_bytes(content)
    argv = ("eval", "--prompts", name, "--methods", "teacher", "--steps", "1")
    argv += ("--num-samples", "2", "--metrics", "prompt_acc,fd_digits")
    code, err = cli_contract(capsys, cwd, *argv, kind="prompt file")
    assert code == (0 if valid else 2), err
    if valid:
        records = (cwd / "results" / "records.jsonl").read_text().splitlines()
        assert {json.loads(r)["metric"] for r in records} == {"prompt_acc", "fd_digits"}


@pytest.mark.slow
def test_a_10_mb_prompt_line(capsys, tmp_path):
    (tmp_path / "long.txt").write_text("x" * 10_000_000 + " a handwritten digit seven\n")
    argv = ("eval", "--prompts", "long.txt", "--methods", "teacher", "--steps", "1")
    argv += ("--num-samples", "2", "--metrics", "prompt_acc")
    assert cli_contract(capsys, tmp_path, *argv, kind="prompt file (10 MB line)")[0] == 0
    (tmp_path / "bad.txt").write_text("y" * 10_000_000 + "\n")
    argv = ("eval", "--prompts", "bad.txt", "--methods", "teacher", "--steps", "1")
    code, err = cli_contract(capsys, tmp_path, *argv, kind="prompt file (10 MB line)")
    assert code == 2 and len(err) < 1000, err
