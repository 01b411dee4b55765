"""Text embeddings cached on disk (``backbone.embed_cache = "disk"``) on tiny-sd3: the same
embeddings and the same trained student as online encoding, built once and reused without an
encoder call, rebuilt where a build was cut short, and built sharded by two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from cdmbench.backbones.sd3 import TinySD3
from cdmbench.embed_cache import EmbedStore

N_PROMPTS = 37  # not a multiple of encode_batch or of the process count


def _prompt_file(folder: Path) -> Path:
    path = folder / "train.txt"
    path.write_text(
        "".join(f"a {c} cube number {i}\n" for i, c in enumerate(["red", "blue", "green"] * 12))
        + "a red cube number 0\n"  # a repeated text
    )
    return path


def _backbone(path: Path, cache: Path | None = None, **kw) -> TinySD3:
    disk = {"embed_cache": "disk", "embed_cache_dir": str(cache)} if cache else {}
    return TinySD3(train_prompts=str(path), encode_batch=4, **disk, **kw)


class Calls:
    """Counts the texts a backbone's text encoders are called on."""

    def __init__(self, bb: TinySD3) -> None:
        self.texts: list[str] = []
        encode = bb._encode_texts

        def counted(texts):
            self.texts += list(texts)
            return encode(texts)

        bb._encode_texts = counted


def _stores(cache: Path) -> list[Path]:
    return sorted(p.parent for p in cache.glob("*/meta.json"))


def test_disk_cache_gives_the_online_embeddings_and_is_reused(tmp_path):
    path = _prompt_file(tmp_path)
    cache = tmp_path / "cache"
    online = _backbone(path)
    texts = [p.text for p in online.prompts("train")]
    sample = [online.prompts("test")[0]]

    disk = _backbone(path, cache)
    calls = Calls(disk)
    disk.prepare_embeddings(tmp_path / "unused", sample)
    assert not (tmp_path / "unused").exists()  # embed_cache_dir wins
    # every training prompt, "" and the sample prompt, in calls of encode_batch texts
    assert sorted(set(calls.texts) - {""}) == sorted(set(texts) | {sample[0].text})
    assert len(calls.texts) % 4 == 0 and len(calls.texts) <= 4 * (10 + 1)
    assert len(_stores(cache)) == 2

    # bitwise the embeddings online encoding gives, for any batch of texts
    for batch in (texts[:5], texts[::-1], ["", sample[0].text, texts[3]]):
        a, b = online.embed(batch), disk.embed(batch)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(disk.null_cond()["prompt_embeds"], online.null_cond()["prompt_embeds"])
    n = len(calls.texts)
    disk.embed(texts)
    assert len(calls.texts) == n  # read from the store: no encoder call
    assert len(disk._embeds.rows) == 0  # and nothing kept in host memory
    disk.embed(["a text in no store"])  # a miss is encoded online
    assert len(calls.texts) == n + 4

    again = _backbone(path, cache)
    calls2 = Calls(again)
    again.prepare_embeddings(tmp_path / "unused", sample)
    again.embed(texts[:7] + [""])
    assert calls2.texts == []  # a second run reuses the store

    # another text-encoder setting is another store
    other = _backbone(path, cache, max_sequence_length=64)
    Calls(other)
    other.prepare_embeddings(tmp_path / "unused")
    assert len(_stores(cache)) == 4


def test_an_interrupted_build_keeps_whole_shards_and_finishes(tmp_path):
    path = _prompt_file(tmp_path)
    cache = tmp_path / "cache"
    first = _backbone(path, cache)
    first.prepare_embeddings(tmp_path)
    store = max(_stores(cache), key=lambda p: EmbedStore(p).n)
    ref = EmbedStore(store)
    expect = [ref.row(i) for i in range(ref.n)]
    (store / "meta.json").unlink()  # as if killed before the index was written
    (store / "index.npy").unlink()
    (store / ".shard-0-of-1.tmp-1").mkdir()  # a half-written shard of a killed process

    resumed = _backbone(path, cache)
    calls = Calls(resumed)
    resumed.prepare_embeddings(tmp_path)
    assert calls.texts == []  # the complete shard was kept
    got = EmbedStore(store)
    assert got.n == N_PROMPTS and all(
        torch.equal(a[k], b[k])
        for a, b in zip(expect, map(got.row, range(got.n)), strict=True)
        for k in a
    )
    assert got.find("a red cube number 0") == 0 and got.find("absent") is None

    import shutil

    shutil.rmtree(store / "shard-0-of-1")
    (store / "meta.json").unlink()
    rebuilt = _backbone(path, cache)
    calls = Calls(rebuilt)
    rebuilt.prepare_embeddings(tmp_path)
    assert len(set(calls.texts) - {""}) == N_PROMPTS - 1  # the missing shard was re-encoded


def test_training_with_the_disk_cache_gives_the_same_student(tmp_path):
    from dataclasses import replace

    from cdmbench.registry import METHODS
    from cdmbench.training.core import TrainConfig, Trainer

    path = _prompt_file(tmp_path)
    students = {}
    for mode in ("online", "disk", "disk again"):
        bb = _backbone(path, tmp_path / "cache" if mode != "online" else None)
        calls = Calls(bb)
        cls = METHODS.get("cdm")
        m = cls(replace(cls.default_config("tiny-sd3"), n_max=3))
        cfg = TrainConfig(iters=2, batch=3, ckpt_every=10**9, log_every=1, sample_every=2)
        trainer = Trainer(bb, m, cfg, tmp_path / mode / "run")
        trainer.train()
        students[mode] = trainer.student.state_dict()
        if mode == "disk again":
            assert calls.texts == []  # training and its sample grid read the stores only
    for mode in ("disk", "disk again"):
        assert all(torch.equal(students["online"][k], v) for k, v in students[mode].items())


# ------------------------------------------------------------------- two processes (gloo)
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_build_the_store_sharded(tmp_path):
    path = _prompt_file(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_port()),
        __file__,
        str(path),
        str(tmp_path / "cache"),
    ]
    proc = subprocess.run(
        cmd, cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    facts = [json.loads((tmp_path / "cache" / f"facts-{r}.json").read_text()) for r in (0, 1)]
    texts = [p.text for p in _backbone(path).prompts("train")]
    for r, f in enumerate(facts):  # each rank encoded its own prompts: r, r + 2, ...
        assert set(f["encoded"]) - {""} == set(texts[r::2])
    store = max(_stores(tmp_path / "cache"), key=lambda p: EmbedStore(p).n)
    assert sorted(p.name for p in store.glob("shard-*")) == ["shard-0-of-2", "shard-1-of-2"]
    got = EmbedStore(store)
    online = _backbone(path).embed(texts)
    for k, v in online.items():  # the same embeddings as one process encoding online
        assert torch.equal(torch.stack([got.row(i)[k] for i in range(got.n)]), v)


def _worker(path: str, cache: str) -> None:
    import torch.distributed as dist

    from cdmbench.distributed import init_distributed

    torch.set_num_threads(1)
    rank, _ = init_distributed("cpu")
    bb = _backbone(Path(path), Path(cache))
    calls = Calls(bb)
    bb.prepare_embeddings(Path(cache))
    Path(cache, f"facts-{rank}.json").write_text(json.dumps({"encoded": calls.texts}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
    # leave without the interpreter's teardown, where gloo's threads have aborted a finished
    # worker under load ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
