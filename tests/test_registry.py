"""The generic plugin registry: decorator and lazy entries, entry points, "did you mean"."""

from __future__ import annotations

import collections
import importlib
import os.path
import sys
import textwrap

import pytest

from cdmbench.registry import (
    BACKBONES,
    METHODS,
    METRICS,
    Registry,
    UnknownNameError,
    suggest,
)


def test_decorator_registers_and_returns_the_object():
    reg = Registry("widget", group="cdmbench.test-no-such-group")

    @reg.register("foo", description="a foo")
    class Foo:
        """Foo docstring."""

    assert Foo.__name__ == "Foo"  # the decorator hands back the class itself
    assert reg.get("foo") is Foo
    assert "foo" in reg
    assert "bar" not in reg
    assert reg.names() == ["foo"]
    assert list(reg) == ["foo"]
    assert reg.describe("foo") == "a foo"


def test_register_with_target_returns_none_and_names_are_sorted():
    reg = Registry("widget", group="cdmbench.test-no-such-group")
    assert reg.register("zeta", int) is None
    assert reg.register("alpha", str) is None
    assert reg.names() == ["alpha", "zeta"]
    assert reg.get("zeta") is int


def test_default_group_is_named_after_the_kind():
    assert Registry("method").group == "cdmbench.methods"
    assert Registry("backbone").group == "cdmbench.backbones"
    assert METHODS.group == "cdmbench.methods"
    assert BACKBONES.group == "cdmbench.backbones"
    assert METRICS.group == "cdmbench.metrics"


def test_lazy_entry_is_resolved_on_first_use():
    reg = Registry("widget", group="cdmbench.test-no-such-group")
    reg.register("od", "collections:OrderedDict", description="ordered")
    assert isinstance(reg.entry("od").target, str)  # not imported yet
    assert reg.get("od") is collections.OrderedDict
    assert reg.entry("od").target is collections.OrderedDict  # cached after loading
    reg.register("join", "os:path.join")  # dotted attribute path
    assert reg.get("join") is os.path.join


def test_lazy_entry_does_not_import_until_used():
    reg = Registry("widget", group="cdmbench.test-no-such-group")
    reg.register("ghost", "cdmbench_no_such_module_xyz:Thing")  # registering imports nothing
    assert "ghost" in reg.names()
    with pytest.raises(ModuleNotFoundError):
        reg.get("ghost")


def test_describe_falls_back_to_first_docstring_line():
    reg = Registry("widget", group="cdmbench.test-no-such-group")

    @reg.register("documented")
    class Documented:
        """First line.

        More text.
        """

    @reg.register("bare")
    class Bare:
        pass

    reg.register("od", "collections:OrderedDict")
    assert reg.describe("documented") == "First line."
    assert reg.describe("bare") == ""
    assert reg.describe("od") == collections.OrderedDict.__doc__.strip().splitlines()[0]


def test_builtin_methods_are_registered_with_descriptions():
    for name in ("cdm", "dmd", "dmd2", "cd"):
        assert name in METHODS
        assert METHODS.describe(name)  # a one-line description, without importing the method
    assert "digits" in BACKBONES
    assert "arXiv 2605.06376" in METHODS.describe("cdm")


def test_unknown_method_suggests_the_closest_name():
    with pytest.raises(UnknownNameError) as info:
        METHODS.get("cmd")
    msg = str(info.value)
    assert "did you mean 'cdm'" in msg
    assert "unknown method 'cmd'" in msg
    assert "dmd2" in msg  # the known names are listed
    assert not msg.startswith(("'", '"'))  # not KeyError's quoted repr
    assert isinstance(info.value, KeyError)


def test_unknown_name_without_close_match_has_no_hint():
    with pytest.raises(UnknownNameError) as info:
        METHODS.entry("zzzzzzzz")
    assert "did you mean" not in str(info.value)
    assert "known:" in str(info.value)


def test_unknown_name_in_empty_registry():
    reg = Registry("widget", group="cdmbench.test-no-such-group")
    with pytest.raises(UnknownNameError, match="known: none"):
        reg.get("x")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cmd", "cdm"),
        ("dmd3", "dmd2"),
        ("CDM", "cdm"),
        ("digit", "digits"),
        ("qqq", None),
    ],
)
def test_suggest(name, expected):
    assert suggest(name, ["cdm", "dmd", "dmd2", "cd", "digits"]) == expected


# ------------------------------------------------------------------------- entry points
@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    """A fake installed distribution declaring a ``cdmbench.methods`` entry point."""
    pkg = tmp_path / "cdmb_test_plugin_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        textwrap.dedent('''
        class MyMethod:
            """A third-party distillation method."""

            name = "mymethod"


        class Shadow:
            """Must not replace a registered entry."""
    ''')
    )
    dist = tmp_path / "cdmb_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cdmb-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[cdmbench.methods]\n"
        "mymethod = cdmb_test_plugin_pkg.mod:MyMethod\n"
        "builtin = cdmb_test_plugin_pkg.mod:Shadow\n"
        "\n"
        "[cdmbench.backbones]\n"
        "otherkind = cdmb_test_plugin_pkg.mod:MyMethod\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for mod in ("cdmb_test_plugin_pkg.mod", "cdmb_test_plugin_pkg"):
        sys.modules.pop(mod, None)


def test_entry_point_plugin_is_picked_up(plugin_on_path):
    reg = Registry("method")
    assert "mymethod" in reg.names()
    assert "mymethod" in reg
    assert "otherkind" not in reg  # another group's entry point
    cls = reg.get("mymethod")
    mod = importlib.import_module("cdmb_test_plugin_pkg.mod")
    assert cls is mod.MyMethod
    assert cls.name == "mymethod"
    assert "cdmb_test_plugin_pkg.mod:MyMethod" in reg.describe("mymethod")


def test_entry_point_does_not_override_registered_entry(plugin_on_path):
    reg = Registry("method")

    @reg.register("builtin")
    class Builtin:
        """Registered in code."""

    assert reg.get("builtin") is Builtin
    assert "mymethod" in reg


def test_entry_point_names_appear_in_did_you_mean(plugin_on_path):
    reg = Registry("method")
    with pytest.raises(UnknownNameError, match="did you mean 'mymethod'"):
        reg.get("mymethd")
