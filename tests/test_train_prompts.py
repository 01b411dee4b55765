"""Training prompts at scale: files served on demand, disjoint packaged halves, overlap
warnings, and backbone weights from one local folder."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest
import torch

from cdmbench.errors import UserError
from cdmbench.prompts_io import (
    PromptFile,
    load_prompt_set,
    open_prompt_source,
    prompt_overlap,
)


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def pairs(prompts) -> list[tuple[str, str]]:
    return [(p.id, p.text) for p in prompts]


# ---------------------------------------------------------------- the same prompts, on demand
FILES = {
    "a.txt": "# header comment\nfirst prompt\n\n  second prompt  \n# skipped\nthird\n",
    "b.jsonl": '{"text": "one"}\n\n{"prompt": "two", "id": "x2"}\n"three"\n{"caption": "four", "id": 7}\n',
    "c.csv": 'id,prompt\np1,"a quoted, prompt"\n,"a prompt over\ntwo lines"\n\n,plain\n',
    "d.tsv": "prompt\tid\nalpha beta\t\ngamma\tg1\n",
    "e.csv": "Prompts,Category\nfirst one,Colors\n\nsecond one,Counting\n",  # DrawBench
    "f.tsv": "Prompt\tCategory\tChallenge\tNote\nA\tX\tY\t\nB\tX\tY\tn\n",  # PartiPrompts
    "g.jsonl": '{"prompt": "g zero", "tag": "single"}\n{"prompt": "g one", "tag": "two"}\n',
    "h": "prompt,id\nno suffix,q\n",  # detected from content
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_file_served_on_demand_equals_whole_read(tmp_path, name):
    path = write(tmp_path, name, FILES[name])
    stream = open_prompt_source(path)
    assert isinstance(stream, PromptFile)
    whole = load_prompt_set(path)[1]
    assert pairs(stream) == pairs(whole)  # sequential read
    assert [pairs([stream[i]]) for i in reversed(range(len(stream)))] == [
        pairs([p]) for p in reversed(whole)
    ]  # random access
    assert pairs(stream[1:]) == pairs(whole[1:]) and pairs([stream[-1]]) == pairs(whole[-1:])


def test_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n")
    assert (
        pairs(PromptFile(path))
        == pairs(load_prompt_set(path)[1])
        == [
            ("bom-1", "one"),
            ("bom-2", "two"),
        ]
    )


def test_whole_read_formats_stay_whole(tmp_path):
    listing = write(tmp_path, "l.json", json.dumps(["a", "b"]))
    coco = write(
        tmp_path,
        "c.json",
        json.dumps({"annotations": [{"image_id": 1, "id": 5, "caption": "x"}]}),
    )
    assert pairs(open_prompt_source(listing)) == [("l-1", "a"), ("l-2", "b")]
    assert pairs(open_prompt_source(coco)) == [("coco-5", "x")]
    assert isinstance(open_prompt_source("general-train"), list)


def test_ten_thousand_prompts_by_offsets(tmp_path):
    n = 10_000
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"prompt number {i} " + "x" * 300}) + "\n")
    size = path.stat().st_size  # ~3.3 MB
    tracemalloc.start()
    prompts = PromptFile(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(prompts) == n
    # what it keeps: two int64 per prompt, not the texts; what opening it peaked at: a
    # fraction of the file, never the whole of it
    assert prompts.offsets.itemsize * len(prompts.offsets) == 8 * n
    assert peak < size / 4, (peak, size)
    assert prompts[n - 1].text.startswith(f"prompt number {n - 1} ")
    assert prompts[4321].id == "big-4322"  # <stem>-<line>
    with pytest.raises(IndexError):
        prompts[n]


def test_draws_are_seeded_and_read_only_what_is_drawn(tmp_path):
    from cdmbench.backbones.base import Backbone

    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(5000)))

    class Texts(Backbone):  # a backbone whose encoding is the drawn texts themselves
        def prompts(self, split="train"):
            return self.source

        def encode(self, prompts):
            self.drawn = [p.text for p in prompts]
            return None

    bb = Texts()
    bb.source = PromptFile(path)
    bb.random_cond(6, torch.Generator().manual_seed(3))
    first = bb.drawn
    bb.random_cond(6, torch.Generator().manual_seed(3))
    assert bb.drawn == first and len(set(first)) > 1
    expected = torch.randint(0, 5000, (6,), generator=torch.Generator().manual_seed(3))
    assert first == [f"prompt {i}" for i in expected.tolist()]


def test_errors_at_open_name_file_and_line(tmp_path):
    path = write(tmp_path, "bad.jsonl", '{"text": "ok"}\n' * 50 + "{oops\n")
    with pytest.raises(UserError, match=r"bad.jsonl, line 51: malformed JSON") as e:
        PromptFile(path)
    assert "\n" not in str(e.value)
    empty = write(tmp_path, "empty.txt", "# only a comment\n\n")
    with pytest.raises(UserError, match="contains no prompts"):
        PromptFile(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(UserError, match="line 2: not UTF-8"):
        PromptFile(latin)


def test_file_changed_after_opening(tmp_path):
    path = write(tmp_path, "p.txt", "one\ntwo\n")
    prompts = PromptFile(path)
    path.write_text("one\ntwo\nthree and more\n")
    with pytest.raises(UserError, match="changed while in use"):
        prompts[0]


# ------------------------------------------------------------- disjoint train and test sets
def test_general_halves_are_disjoint_and_cover_the_set():
    whole = load_prompt_set("general")[1]
    train = load_prompt_set("general-train")[1]
    test = load_prompt_set("general-test")[1]
    assert len(train) == len(test) == 150
    assert {p.id for p in train}.isdisjoint(p.id for p in test)
    assert sorted(pairs(train + test)) == sorted(pairs(whole))
    assert test[0].id == "gen-0001" and train[0].id == "gen-0002"
    assert prompt_overlap(train, test) == 0 and prompt_overlap(whole, test) == 150


@pytest.fixture(scope="module")
def tiny_sd3():
    from cdmbench.backbones.sd3 import TinySD3

    return TinySD3


def test_default_prompt_sets_are_disjoint_and_overlap_warns(tiny_sd3, tmp_path, capfd):
    bb = tiny_sd3()
    assert bb.warn_prompt_overlap() == 0 and capfd.readouterr().err == ""
    assert pairs(bb.prompts("train")) == pairs(load_prompt_set("general-train")[1])
    # a training file holding two of the evaluation prompts (one differing in case/spaces)
    test = bb.prompts("test")
    lines = ["a prompt of its own", test[3].text, "  " + test[7].text.upper() + " "]
    path = write(tmp_path, "mine.txt", "\n".join(lines) + "\n")
    mixed = tiny_sd3(train_prompts=str(path))
    assert isinstance(mixed.prompts("train"), PromptFile)
    assert mixed.warn_prompt_overlap() == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "2 of the 150 evaluation prompts" in err and "mine.txt" in err


def test_tiny_sd3_trains_on_a_streamed_file(tiny_sd3, tmp_path):
    from cdmbench.config import resolve
    from cdmbench.registry import METHODS
    from cdmbench.training.run import train_run

    path = tmp_path / "many.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"a red cube number {i}"}) + "\n" for i in range(3000))
    )
    bb = tiny_sd3(train_prompts=str(path), embed_cache_size=8)
    cls = METHODS.get("dmd")
    train_cfg, method_cfg = resolve(cls, "tiny-sd3", None, [], iters=2, batch=3)
    m = cls(method_cfg)
    res = train_run(m, bb, train_cfg, tmp_path / "runs", sample_steps=(1,))
    assert (res.run_dir / "run.json").is_file()
    assert len(m.reg_data) == 2 * 3  # sized from the run: iterations x batch
    assert m.reg_data.meta["prompts_sha256"]  # keyed by the file's content, not read whole
    # the LRU bound, or one call's texts when more (the final grid encodes 10 prompts at once)
    assert len(bb._embeds.rows) <= 10


def test_encode_batch_pads_so_embeddings_do_not_depend_on_batch_mates(tiny_sd3):
    texts = ["a red cube", "a blue sphere", "a green cone"]
    one = tiny_sd3(encode_batch=4)
    alone = torch.cat([one.embed([t])["prompt_embeds"] for t in texts])
    together = tiny_sd3(encode_batch=4).embed(texts)["prompt_embeds"]
    assert torch.equal(alone, together)
    with pytest.raises(UserError, match="encode_batch"):
        tiny_sd3(encode_batch=0)


# --------------------------------------------------------------- weights from one folder
@pytest.fixture(scope="module")
def pipeline_dir(tiny_sd3, tmp_path_factory) -> Path:
    """A complete tiny SD3 pipeline saved as diffusers saves one."""
    root = tmp_path_factory.mktemp("pipe") / "tiny-sd3-pipeline"
    bb = tiny_sd3()
    bb.pipeline(bb.load_teacher()).save_pretrained(root)
    return root


def _forbid_hub(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("the hub was asked for weights")

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)


def _train_sd3(tmp_path, weights: Path, capsys) -> tuple[int, str]:
    """`cdmbench train` (the entry point, as a user runs it): exit status and stderr."""
    from cdmbench.cli import main

    args = ["train", "cdm", "--backbone", "sd3", "--iters", "1", "--batch", "1"]
    args += ["--out", str(tmp_path / "runs"), "--teacher-weights", str(weights)]
    args += ["--set", "backbone.resolution=64", "--set", "method.n_max=2"]
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_teacher_weights_folder_names_every_component(pipeline_dir, tmp_path, monkeypatch, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    monkeypatch.delenv("CDMBENCH_SD3", raising=False)
    _forbid_hub(monkeypatch)
    code, output = _train_sd3(tmp_path, pipeline_dir, capsys)
    assert code == 0, output
    run = next((tmp_path / "runs" / "sd3").iterdir())
    info = json.loads((run / "run.json").read_text())
    assert info["backbone_settings"]["weights"] == str(pipeline_dir)
    assert info["teacher"].startswith("folder:")


def test_local_folder_lacking_a_component_is_one_line(pipeline_dir, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.delenv("CDMBENCH_SD3", raising=False)
    _forbid_hub(monkeypatch)
    partial = tmp_path / "partial"
    shutil.copytree(pipeline_dir, partial)
    shutil.rmtree(partial / "text_encoder_2")
    code, output = _train_sd3(tmp_path, partial, capsys)
    assert code == 2
    line = output.strip()
    assert "\n" not in line and "text_encoder_2/" in line and str(partial) in line
