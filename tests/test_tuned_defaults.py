"""The tuned digits defaults are the committed sweep's best trials, at the same K for all."""

import json
from pathlib import Path

import pytest

from cdmbench.registry import METHODS
from cdmbench.sweep import best_params
from cdmbench.training.method import config_to_dict

RESULTS = Path(__file__).resolve().parents[1] / "results"
BUILTIN = ("cdm", "dmd", "dmd2", "cd")


def _lines() -> list[dict]:
    return [json.loads(line) for line in (RESULTS / "sweeps.jsonl").read_text().splitlines()]


def test_every_method_was_searched_with_the_same_budget():
    lines = [r for r in _lines() if r["backbone"] == "digits" and r["seed"] == 0]
    k = {m: len({r["trial"] for r in lines if r["method"] == m}) for m in BUILTIN}
    assert set(k.values()) == {16}, k
    assert {(r["train_iters"], r["per_prompt"], r["base"]) for r in lines} == {(300, 50, "paper")}


@pytest.mark.parametrize("name", BUILTIN)
def test_tuned_is_the_paper_variant_with_the_best_trials_settings(name):
    cls = METHODS.get(name)
    best = best_params(RESULTS, name, "digits", seed=0, base="paper")
    assert best, f"no sweep of {name} in {RESULTS / 'sweeps.jsonl'}"
    paper = config_to_dict(cls.default_config("digits", "paper"))
    tuned = config_to_dict(cls.default_config("digits", "tuned"))
    want = {k: tuple(v) if isinstance(paper[k], tuple) else v for k, v in best.items()}
    assert tuned == paper | want
    assert cls.default_train("digits", "tuned") == cls.default_train("digits", "paper")
