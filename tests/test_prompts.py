"""Prompt sets: packaged sets, every file format, hash ids, and one-line user errors."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest

from cdmbench.backbones.digits import Digits
from cdmbench.errors import UserError
from cdmbench.prompts_io import load_prompt_set, prompt_set_hash


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def ids_texts(prompts) -> list[tuple[str, str]]:
    return [(p.id, p.text) for p in prompts]


def user_error(path: Path | str, match: str, **kwargs) -> str:
    """Load, expect a UserError matching ``match``; check it is one line naming the file."""
    with pytest.raises(UserError, match=match) as info:
        load_prompt_set(str(path), **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg
    assert str(path) in msg
    return msg


# ---------------------------------------------------------------------------- packaged sets
def test_general_set_has_300_unique_prompts():
    set_id, prompts = load_prompt_set("general")
    assert set_id.startswith("general-") and len(set_id) == len("general-") + 12
    assert len(prompts) == 300
    assert len({p.id for p in prompts}) == 300
    assert len({p.text.lower() for p in prompts}) == 300
    assert prompts[0].id == "gen-0001" and prompts[-1].id == "gen-0300"
    assert all(p.label is None for p in prompts)


def test_general_file_categories_and_lengths():
    text = resources.files("cdmbench.prompts").joinpath("general.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 300
    assert all(set(r) == {"id", "category", "text"} for r in rows)
    categories = {r["category"] for r in rows}
    assert len(categories) == 12
    words = [len(r["text"].split()) for r in rows]
    assert min(words) >= 5 and max(words) <= 40
    assert max(words) >= 30  # varied lengths, not all short


def test_digits_set_matches_backbone():
    set_id, prompts = load_prompt_set("digits")
    assert len(prompts) == 10
    assert prompts[7].id == "digit-7" and prompts[7].text == "a handwritten digit seven"
    assert [p.label for p in prompts] == list(range(10))
    backbone = Digits()
    assert ids_texts(prompts) == ids_texts(backbone.prompts("test"))
    default_id, default = load_prompt_set("default", backbone=backbone)
    assert ids_texts(default) == ids_texts(prompts)
    assert default_id == set_id  # same content, same name: same id


def test_default_without_backbone_is_general():
    assert load_prompt_set("default") == load_prompt_set("general")


def test_limit_keeps_first_prompts_and_changes_hash():
    full_id, full = load_prompt_set("general")
    set_id, prompts = load_prompt_set("general", limit=5)
    assert ids_texts(prompts) == ids_texts(full[:5])
    assert set_id != full_id and set_id.startswith("general-")
    assert load_prompt_set("digits", limit=100)[1] == load_prompt_set("digits")[1]


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_bad_limit(limit):
    with pytest.raises(UserError, match="limit") as info:
        load_prompt_set("general", limit=limit)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------- hashes
def test_hash_is_sha256_of_id_text_pairs(tmp_path):
    path = write(tmp_path, "mine.txt", "a red apple\na blue car\n")
    set_id, prompts = load_prompt_set(str(path))
    pairs = json.dumps(
        [["mine-1", "a red apple"], ["mine-2", "a blue car"]],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    expected = hashlib.sha256(pairs.encode()).hexdigest()[:12]
    assert set_id == f"mine-{expected}" == f"mine-{prompt_set_hash(prompts)}"


def test_hash_stable_and_content_sensitive(tmp_path):
    a = write(tmp_path, "a.txt", "a red apple\na blue car\n")
    (tmp_path / "b").mkdir()
    b = write(tmp_path / "b", "a.txt", "a red apple\na green car\n")
    assert load_prompt_set(str(a))[0] == load_prompt_set(a)[0]  # str or Path, same id
    first = load_prompt_set(str(a))[0]
    assert load_prompt_set(str(b))[0] != first  # one word changed
    reordered = write(tmp_path, "c.txt", "a blue car\na red apple\n")
    assert load_prompt_set(str(reordered))[0].split("-")[1] != first.split("-")[1]
    # same (id, text) pairs from another format give the same hash
    same = write(
        tmp_path,
        "a.jsonl",
        '{"id": "a-1", "text": "a red apple"}\n{"id": "a-2", "text": "a blue car"}\n',
    )
    assert load_prompt_set(str(same))[0] == first


# ------------------------------------------------------------------------------ own files
def test_txt(tmp_path):
    path = write(
        tmp_path,
        "my prompts.txt",
        "# a comment\n\na red apple\n  a blue car  \r\n# another\na cat\n",
    )
    set_id, prompts = load_prompt_set(str(path))
    assert ids_texts(prompts) == [
        ("my_prompts-3", "a red apple"),
        ("my_prompts-4", "a blue car"),
        ("my_prompts-6", "a cat"),
    ]
    assert set_id.startswith("my_prompts-")


def test_jsonl_keys_and_ids(tmp_path):
    path = write(
        tmp_path,
        "set.jsonl",
        "\n".join(
            [
                json.dumps({"id": "p-a", "text": "a red apple", "category": "food"}),
                "",
                json.dumps({"prompt": "a blue car"}),
                json.dumps({"id": 17, "caption": "a cat on a mat"}),
                json.dumps("a bare string prompt"),
            ]
        )
        + "\n",
    )
    _, prompts = load_prompt_set(str(path))
    assert ids_texts(prompts) == [
        ("p-a", "a red apple"),
        ("set-3", "a blue car"),
        ("17", "a cat on a mat"),
        ("set-5", "a bare string prompt"),
    ]


def test_json_list(tmp_path):
    path = write(tmp_path, "list.json", json.dumps(["a red apple", {"id": "x", "text": "a car"}]))
    _, prompts = load_prompt_set(str(path))
    assert ids_texts(prompts) == [("list-1", "a red apple"), ("x", "a car")]


def test_csv_with_id_column(tmp_path):
    path = write(tmp_path, "t.csv", 'id,prompt,extra\np1,"a red apple, sliced",x\n,a car,y\n')
    _, prompts = load_prompt_set(str(path))
    assert ids_texts(prompts) == [("p1", "a red apple, sliced"), ("t-3", "a car")]


@pytest.mark.parametrize("column", ["prompt", "text", "caption", "Prompt", "TEXT"])
def test_csv_text_columns(tmp_path, column):
    path = write(tmp_path, "t.csv", f"n,{column}\n1,a red apple\n\n2,a blue car\n")
    _, prompts = load_prompt_set(str(path))
    assert ids_texts(prompts) == [("t-2", "a red apple"), ("t-4", "a blue car")]


def test_tsv(tmp_path):
    path = write(tmp_path, "t.tsv", 'text\tid\na sign that says "hi", in red\tq1\n')
    _, prompts = load_prompt_set(str(path))
    assert ids_texts(prompts) == [("q1", 'a sign that says "hi", in red')]
    one_column = write(tmp_path, "one.tsv", "prompt\na red apple, sliced\n")
    assert ids_texts(load_prompt_set(str(one_column))[1]) == [("one-2", "a red apple, sliced")]


def test_detect_from_content_without_suffix(tmp_path):
    lines = write(tmp_path, "plain", "a red apple\na blue car\n")
    assert [p.id for p in load_prompt_set(str(lines))[1]] == ["plain-1", "plain-2"]
    table = write(tmp_path, "table", "prompt,id\na red apple,z\n")
    assert ids_texts(load_prompt_set(str(table))[1]) == [("z", "a red apple")]
    records = write(tmp_path, "records", '{"text": "a red apple"}\n')
    assert ids_texts(load_prompt_set(str(records))[1]) == [("records-1", "a red apple")]


# ---------------------------------------------------------------------------- standard sets
COCO = {
    "info": {},
    "images": [{"id": 42}, {"id": 7}],
    "annotations": [
        {"image_id": 42, "id": 1001, "caption": "A man riding a  bike.\n"},
        {"image_id": 7, "id": 900, "caption": "Two dogs on a couch."},
        {"image_id": 42, "id": 1002, "caption": "Someone cycling down a road."},
        {"image_id": 42, "id": 1003, "caption": "A cyclist in the street."},
    ],
}


def test_coco_first_caption_per_image(tmp_path):
    path = write(tmp_path, "captions_val2014.json", json.dumps(COCO))
    set_id, prompts = load_prompt_set(str(path))
    assert ids_texts(prompts) == [
        ("coco-1001", "A man riding a bike."),
        ("coco-900", "Two dogs on a couch."),
    ]
    assert set_id.startswith("captions_val2014-")
    _, two = load_prompt_set(str(path), captions_per_image=2)
    assert [p.id for p in two] == ["coco-1001", "coco-900", "coco-1002"]
    _, every = load_prompt_set(str(path), captions_per_image=None)
    assert [p.id for p in every] == ["coco-1001", "coco-900", "coco-1002", "coco-1003"]
    _, forced = load_prompt_set(str(write(tmp_path, "caps.dat", json.dumps(COCO))), fmt="coco")
    assert ids_texts(forced) == ids_texts(prompts)


def test_coco_detected_without_suffix(tmp_path):
    path = write(tmp_path, "caps", json.dumps(COCO, indent=1))
    assert [p.id for p in load_prompt_set(str(path))[1]] == ["coco-1001", "coco-900"]


def test_drawbench(tmp_path):
    path = write(
        tmp_path,
        "drawbench.csv",
        "Prompts,Category\nA red colored car.,Colors\n"
        '"A storefront with ""Text"" written on it, at night.",Text\n,\n'
        "A black colored dog.,Colors\n",
    )
    _, prompts = load_prompt_set(str(path))
    assert ids_texts(prompts) == [
        ("drawbench-0", "A red colored car."),
        ("drawbench-1", 'A storefront with "Text" written on it, at night.'),
        ("drawbench-2", "A black colored dog."),
    ]


def test_parti(tmp_path):
    path = write(
        tmp_path,
        "PartiPrompts.tsv",
        "Prompt\tCategory\tChallenge\tNote\n"
        "bond\tAbstract\tBasic\tBiology-inspired concepts\n"
        'A robot painted as graffiti. The words "Fly an airplane" are on the wall.'
        "\tOutdoor Scenes\tComplex\t\n"
        "flying over the city of Mars. \tWorld Knowledge\tComplex\t\n",
    )
    set_id, prompts = load_prompt_set(str(path))
    assert ids_texts(prompts) == [
        ("parti-0", "bond"),
        ("parti-1", 'A robot painted as graffiti. The words "Fly an airplane" are on the wall.'),
        ("parti-2", "flying over the city of Mars."),
    ]
    assert set_id.startswith("PartiPrompts-")
    forced = write(tmp_path, "parti.txt", path.read_text())
    assert ids_texts(load_prompt_set(str(forced), fmt="parti")[1]) == ids_texts(prompts)


def test_geneval(tmp_path):
    rows = [
        {
            "tag": "single_object",
            "include": [{"class": "bench", "count": 1}],
            "prompt": "a photo of a bench",
        },
        {
            "tag": "counting",
            "include": [{"class": "cat", "count": 2}],
            "prompt": "a photo of two cats",
        },
    ]
    path = write(
        tmp_path,
        "evaluation_metadata.jsonl",
        json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n",
    )
    _, prompts = load_prompt_set(str(path))
    assert ids_texts(prompts) == [
        ("geneval-0", "a photo of a bench"),
        ("geneval-1", "a photo of two cats"),
    ]
    _, generic = load_prompt_set(str(path), fmt="jsonl")  # explicit format wins
    assert [p.id for p in generic] == ["evaluation_metadata-1", "evaluation_metadata-3"]


def test_standard_set_limit(tmp_path):
    path = write(tmp_path, "drawbench.csv", "Prompts,Category\na,X\nb,X\nc,X\n")
    set_id, prompts = load_prompt_set(str(path), limit=2)
    assert [p.id for p in prompts] == ["drawbench-0", "drawbench-1"]
    assert set_id != load_prompt_set(str(path))[0]


# ---------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    user_error(tmp_path / "nope.txt", "no such file")


def test_directory(tmp_path):
    user_error(tmp_path, "directory")


@pytest.mark.parametrize("name,text", [("e.txt", ""), ("e.jsonl", "\n  \n"), ("e.csv", " ")])
def test_empty_file(tmp_path, name, text):
    user_error(write(tmp_path, name, text), "empty")


def test_no_prompts(tmp_path):
    user_error(write(tmp_path, "c.txt", "# only a comment\n\n"), "no prompts")
    user_error(write(tmp_path, "h.csv", "prompt,id\n,\n"), "no prompts")


def test_malformed_jsonl_line(tmp_path):
    path = write(tmp_path, "bad.jsonl", '{"text": "ok"}\n{"text": "broken\n')
    assert "line 2" in user_error(path, "malformed JSON")


def test_jsonl_without_text_field(tmp_path):
    path = write(tmp_path, "bad.jsonl", '{"text": "ok"}\n{"title": "no prompt"}\n')
    assert "line 2" in user_error(path, "no 'text', 'prompt' or 'caption'")


@pytest.mark.parametrize(
    "line", ['{"text": ""}', '{"text": 3}', "[1, 2]", '{"id": [1], "text": "a"}']
)
def test_jsonl_bad_values(tmp_path, line):
    user_error(write(tmp_path, "bad.jsonl", line + "\n"), "line 1")


def test_malformed_coco(tmp_path):
    path = write(tmp_path, "captions.json", '{"annotations": [\n{"id": 1,\n')
    assert "line" in user_error(path, "malformed JSON")


def test_coco_without_annotations(tmp_path):
    user_error(write(tmp_path, "captions.json", '{"images": []}'), "annotations")


def test_coco_annotation_missing_keys(tmp_path):
    data = {"annotations": [{"id": 1, "caption": "x"}]}
    path = write(tmp_path, "captions.json", json.dumps(data))
    assert "annotation 0" in user_error(path, "image_id")


def test_coco_bad_captions_per_image(tmp_path):
    path = write(tmp_path, "captions.json", json.dumps(COCO))
    user_error(path, "captions_per_image", captions_per_image=0)


def test_csv_without_text_column(tmp_path):
    path = write(tmp_path, "bad.csv", "name,category\nx,y\n")
    assert "line 1" in user_error(path, "column")
    user_error(write(tmp_path, "bad.tsv", "Prompts\tNote\nx\ty\n"), "column", fmt="parti")


def test_csv_empty_prompt_cell(tmp_path):
    path = write(tmp_path, "bad.csv", "prompt,id\na red apple,1\n,2\n")
    assert "line 3" in user_error(path, "empty prompt")


def test_malformed_csv(tmp_path):
    path = write(tmp_path, "bad.csv", 'prompt\na blue car\n"a red apple\na green car\n')
    assert "line 3" in user_error(path, "malformed CSV")


def test_geneval_record_without_prompt(tmp_path):
    path = write(tmp_path, "meta.jsonl", '{"tag": "x", "prompt": "a"}\n{"tag": "y"}\n')
    assert "line 2" in user_error(path, "GenEval")


def test_duplicate_ids(tmp_path):
    path = write(tmp_path, "dup.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    msg = user_error(path, "duplicate id 'a'")
    assert "line 2" in msg and "line 1" in msg


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    user_error(path, "UTF-8")


def test_unknown_format(tmp_path):
    user_error(write(tmp_path, "a.txt", "a red apple\n"), "unknown prompt format", fmt="yaml")


def test_prompts_do_not_import_backbones():
    """Dependencies point down: the prompt module imports no backbone (nor torch)."""
    import subprocess
    import sys

    code = (
        "import sys, cdmbench.prompts_io as p; "
        "print(any(m.startswith('cdmbench.backbones') or m == 'torch' for m in sys.modules), "
        "p.Prompt.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "cdmbench.prompts_io"]
    from cdmbench.backbones import Prompt as FromBackbones
    from cdmbench.prompts_io import Prompt

    assert FromBackbones is Prompt
