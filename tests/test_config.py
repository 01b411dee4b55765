"""Step lists and the layered run configuration (defaults < backbone < TOML < --set)."""

from __future__ import annotations

import pytest

from cdmbench.config import backbone_settings, parse_sets, parse_steps, resolve
from cdmbench.errors import UserError
from cdmbench.registry import METHODS
from cdmbench.training.core import TrainConfig

# cdmbench.methods.cdm.CDM, loaded through the registry (ruff's isort would otherwise class the
# `methods/` package, installed as cdmbench.methods, as third-party).
CDM = METHODS.get("cdm")
CDMConfig = CDM.Config


# ---------------------------------------------------------------------------- parse_steps
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,2,4", [1, 2, 4]),
        (" 1, 2 ", [1, 2]),
        ("4", [4]),
        ("8,1", [8, 1]),  # order is kept
        ("1, 2, 4, 8, 50", [1, 2, 4, 8, 50]),
    ],
)
def test_parse_steps_accepts(text, expected):
    assert parse_steps(text) == expected


@pytest.mark.parametrize(
    "text", ["0", "-1", "a", "1,,2", "", "1,1", " ", "1,", ",1", "1.5", "2,0", "1,a,3", "1;2"]
)
def test_parse_steps_rejects_with_user_error(text):
    with pytest.raises(UserError) as info:
        parse_steps(text)
    assert "step" in str(info.value)


def test_parse_steps_names_the_bad_item():
    with pytest.raises(UserError, match="'a'"):
        parse_steps("1,a,3")
    with pytest.raises(UserError, match="duplicate"):
        parse_steps("1,2,1")
    with pytest.raises(UserError, match=">= 1"):
        parse_steps("2,0")


@pytest.mark.parametrize("text", ["--1", "1,--2"])
def test_parse_steps_rejects_double_minus_with_user_error(text):
    with pytest.raises(UserError):
        parse_steps(text)


# -------------------------------------------------------------------------------- resolve
def test_resolve_backbone_defaults_for_digits():
    assert CDM.__module__ == "cdmbench.methods.cdm"
    train, method = resolve(CDM, "digits")
    assert isinstance(train, TrainConfig) and isinstance(method, CDMConfig)
    bd = CDM.backbone_defaults["digits"]
    assert train.iters == bd["train"]["iters"] == 1500
    assert train.batch == bd["train"]["batch"] == 128
    assert method.n_max == bd["n_max"] == 13
    assert method.update_ratio == bd["update_ratio"] == 6
    assert method.student_lr == bd["student_lr"]
    # untouched settings keep the dataclass defaults
    assert train.seed == TrainConfig().seed
    assert method.inner_lo == CDMConfig().inner_lo
    assert method.eval_sigmas == (1.0, 0.75, 0.5, 0.25)


def test_resolve_reference_defaults_for_a_backbone_without_overrides():
    train, method = resolve(CDM, "sd3")
    assert train == TrainConfig()
    assert method == CDMConfig()
    assert method.n_max == 28 and method.update_ratio == 2 and method.cfg_aug_scale == 7.0


def test_resolve_does_not_mutate_class_defaults():
    resolve(CDM, "digits", sets=["n_max=3", "train.iters=2"])
    assert CDM.backbone_defaults["digits"]["n_max"] == 13
    assert CDM.backbone_defaults["digits"]["train"]["iters"] == 1500
    assert CDMConfig().n_max == 28 and TrainConfig().iters == 1000


def test_resolve_sets_with_type_coercion():
    sets = ["method.update_ratio=3", "train.iters=7", "n_max=4"]
    train, method = resolve(CDM, "digits", sets=sets)
    assert method.update_ratio == 3 and type(method.update_ratio) is int
    assert train.iters == 7 and type(train.iters) is int
    assert method.n_max == 4 and type(method.n_max) is int  # bare method key
    assert train.batch == 128  # other backbone defaults stay


def test_resolve_sets_bare_train_key_goes_to_train():
    train, method = resolve(CDM, "digits", sets=["iters=9", "seed=3"])
    assert train.iters == 9 and train.seed == 3


def test_resolve_sets_method_name_as_section():
    _, method = resolve(CDM, "digits", sets=["cdm.n_max=5"])
    assert method.n_max == 5


@pytest.mark.parametrize(
    ("item", "field", "expected"),
    [
        ("method.student_lr=3e-4", "student_lr", 3e-4),
        ("method.cfg_aug_scale=2", "cfg_aug_scale", 2.0),
        ("method.offtraj=false", "offtraj", False),
        ("method.ontraj=0", "ontraj", False),
        ("method.cap_dm_tau=true", "cap_dm_tau", True),
        ("method.cap_dm_tau=yes", "cap_dm_tau", True),
        ("method.schedule=fixed", "schedule", "fixed"),
    ],
)
def test_resolve_sets_coerce_each_type(item, field, expected):
    _, method = resolve(CDM, "digits", sets=[item])
    value = getattr(method, field)
    assert value == expected
    assert type(value) is type(expected)


def test_resolve_sets_int_tuple():
    _, method = resolve(METHODS.get("cd"), "digits", sets=["method.edges=0,10,20,30"])
    assert method.edges == (0, 10, 20, 30)
    assert all(type(e) is int for e in method.edges)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("method.eval_sigmas=1.0,0.5", (1.0, 0.5)),
        ("method.eval_sigmas=(1.0, 0.6, 0.3)", (1.0, 0.6, 0.3)),
    ],
)
def test_resolve_sets_float_tuple(item, expected):
    _, method = resolve(CDM, "digits", sets=[item])
    assert method.eval_sigmas == expected
    assert all(type(e) is float for e in method.eval_sigmas)


def test_resolve_sets_value_may_contain_equals_and_spaces():
    assert parse_sets([" train.iters = 5 ", "method.schedule=a=b"]) == {
        "train.iters": "5",
        "method.schedule": "a=b",
    }
    train, _ = resolve(CDM, "digits", sets=[" train.iters = 5 "])
    assert train.iters == 5


@pytest.mark.parametrize(
    ("item", "hint"),
    [
        ("method.n_mx=4", "did you mean 'method.n_max'"),
        ("train.iter=5", "did you mean 'train.iters'"),
        ("method.update_ration=3", "did you mean 'method.update_ratio'"),
    ],
)
def test_resolve_unknown_key_suggests(item, hint):
    with pytest.raises(UserError) as info:
        resolve(CDM, "digits", sets=[item])
    assert "unknown setting" in str(info.value)
    assert hint in str(info.value)


def test_resolve_rejects_bad_sets():
    with pytest.raises(UserError, match="unknown section"):
        resolve(CDM, "digits", sets=["foo.iters=3"])
    with pytest.raises(UserError, match="key=value"):
        resolve(CDM, "digits", sets=["train.iters"])
    with pytest.raises(UserError, match="train.iters"):
        resolve(CDM, "digits", sets=["train.iters=abc"])
    with pytest.raises(UserError, match="method.offtraj"):
        resolve(CDM, "digits", sets=["method.offtraj=maybe"])
    with pytest.raises(UserError, match="unknown setting"):
        resolve(CDM, "digits", sets=["completely_unknown=1"])


def test_resolve_keyword_train_overrides():
    train, _ = resolve(CDM, "digits", iters=11, batch=None)
    assert train.iters == 11
    assert train.batch == 128  # None means "not given"


def test_resolve_toml_layer_and_precedence(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        "[train]\niters = 11\nseed = 5\n\n"
        '[method]\nn_max = 3\nupdate_ratio = 4\nschedule = "fixed"\nstudent_lr = 1e-3\n'
    )
    train, method = resolve(CDM, "digits", config_file=str(cfg))
    assert (train.iters, train.seed, train.batch) == (11, 5, 128)
    assert (method.n_max, method.update_ratio, method.schedule) == (3, 4, "fixed")
    assert method.student_lr == 1e-3
    assert method.fake_lr == CDM.backbone_defaults["digits"]["fake_lr"]  # backbone default kept

    # --set beats the file, keyword overrides sit between them
    train, method = resolve(
        CDM, "digits", config_file=str(cfg), sets=["n_max=6", "train.seed=9"], iters=13
    )
    assert (train.iters, train.seed) == (13, 9)
    assert (method.n_max, method.update_ratio) == (6, 4)


def test_resolve_toml_unknown_key_and_errors(tmp_path):
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text("[method]\nn_mx = 3\n")
    with pytest.raises(UserError, match="did you mean 'method.n_max'"):
        resolve(CDM, "digits", config_file=str(bad_key))
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[train\niters = 3\n")
    with pytest.raises(UserError, match="not valid TOML"):
        resolve(CDM, "digits", config_file=str(bad_toml))
    with pytest.raises(UserError, match="not found"):
        resolve(CDM, "digits", config_file=str(tmp_path / "missing.toml"))


# ------------------------------------------------------------------------ backbone section
def test_backbone_settings_layers_and_coercion(tmp_path):
    from cdmbench.backbones.sd3 import SD3

    cfg = tmp_path / "run.toml"
    cfg.write_text(
        "[train]\niters = 3\n\n[backbone]\nresolution = 512\ndrop_t5 = true\nteacher_guidance = 5\n"
    )
    s = backbone_settings(SD3, str(cfg), ["backbone.resolution=768", "train.iters=4", "n_max=2"])
    assert (s.resolution, s.drop_t5, s.teacher_guidance) == (768, True, 5)  # --set beats the file
    assert type(s.resolution) is int and s.max_sequence_length == 256  # declared default kept
    # the backbone section does not leak into train/method, and theirs not into it
    train, method = resolve(CDM, "sd3", config_file=str(cfg), sets=["backbone.resolution=768"])
    assert train.iters == 3 and not hasattr(method, "resolution")
    with pytest.raises(UserError, match="did you mean 'backbone.drop_t5'"):
        backbone_settings(SD3, sets=["backbone.drop_t4=1"])
    with pytest.raises(UserError, match="only backbone.KEY"):
        backbone_settings(SD3, sets=["train.iters=4"], only_backbone=True)
    with pytest.raises(UserError, match="backbone.drop_t5"):
        backbone_settings(SD3, sets=["backbone.drop_t5=maybe"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[backbone]\nresolutoin = 64\n")
    with pytest.raises(UserError, match="did you mean 'backbone.resolution'"):
        backbone_settings(SD3, str(bad))
    bad.write_text("[backbones]\nresolution = 64\n")
    with pytest.raises(UserError, match="unknown table"):
        backbone_settings(SD3, str(bad))


def test_unhashed_settings_stay_out_of_the_run_payload():
    from cdmbench.backbones import get_backbone
    from cdmbench.config import run_payload

    a, b = get_backbone("digits"), get_backbone("digits", eval_batch=7, eval_samples=3)
    pa = run_payload("cdm", a, TrainConfig(), CDMConfig())
    assert pa == run_payload("cdm", b, TrainConfig(), CDMConfig())
    assert pa["backbone_settings"] == {"teacher_steps": 50, "teacher_guidance": 2.0}
    c = get_backbone("digits", teacher_guidance=3.0)
    assert run_payload("cdm", c, TrainConfig(), CDMConfig()) != pa
