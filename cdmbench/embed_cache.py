"""Text embeddings cached on disk: encoded once, sharded across ranks, read memory-mapped.

A store is a folder holding the fixed-shape (padded) embeddings of a sequence of texts, row
``i`` for text ``i``, as the backbone's own ``encode_prompt`` gives them:

- ``shard-<r>-of-<W>/``: rank ``r``'s rows (texts ``r``, ``r + W``, ...), one raw file per
  tensor name (``<name>.bin``: ``[rows, *shape]`` in the encoder's output dtype),
  ``fields.json`` (names, shapes, dtypes) and ``hashes.npy`` (each row's text key). Each rank
  writes its shard into a temporary folder and renames it when complete, so a killed build
  leaves whole shards (reused by the next build with the same process count) or nothing.
- ``index.npy``: the sorted text keys with their rows (first occurrence of a text), for
  lookup by text; ``meta.json``, written last by rank 0: the store is complete.

Reading memory-maps the shards: host memory holds only the page cache of the rows read, the
GPU only the batch. A text key is the first 8 bytes of BLAKE2b over the UTF-8 text (a
collision among 10^6 texts has probability ~3e-8).

The store's folder name is a hash of what its contents depend on (the texts' source and the
text encoders' identity and settings, :func:`store_key`): a second run reuses it and a change
builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cdmbench import distributed
from cdmbench.errors import UserError
from cdmbench.io import atomic_path, atomic_write_json, temp_dir

VERSION = 1  # of the on-disk layout
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # storage type per item size
_INT = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


def text_key(text: str) -> int:
    """A text's 64-bit key: the first 8 bytes of BLAKE2b over its UTF-8 bytes."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def store_key(payload: dict[str, Any]) -> str:
    """16 hex digits of sha256 over ``payload`` (JSON, sorted keys) and the layout version."""
    blob = json.dumps({"version": VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


class EmbedStore:
    """A complete store, memory-mapped: rows by text (:meth:`get`) or by index (:meth:`row`)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        meta = json.loads((self.root / "meta.json").read_text())
        self.n, self.world = int(meta["n"]), int(meta["world"])
        self.fields = {
            k: (tuple(v["shape"]), _dtype(v["dtype"])) for k, v in meta["fields"].items()
        }
        index = np.load(self.root / "index.npy", mmap_mode="r")
        self.keys, self.rows = index[0], index[1]
        self.maps: list[dict[str, np.memmap]] = []
        for r in range(self.world):
            count = len(range(r, self.n, self.world))
            shard = self.root / f"shard-{r}-of-{self.world}"
            self.maps.append(
                {
                    k: np.memmap(
                        shard / f"{k}.bin",
                        dtype=_RAW[dt.itemsize],
                        mode="r",
                        shape=(count, *shape),
                    )
                    for k, (shape, dt) in self.fields.items()
                }
                if count
                else {}
            )

    def __len__(self) -> int:
        return self.n

    def find(self, text: str) -> int | None:
        """The row of ``text``, or None when the store does not hold it."""
        key = np.uint64(text_key(text))
        i = int(np.searchsorted(self.keys, key))
        if i < len(self.keys) and self.keys[i] == key:
            return int(self.rows[i])
        return None

    def row(self, i: int) -> dict[str, Tensor]:
        """Row ``i``'s tensors (CPU, the encoder's dtype), read from the page cache or disk."""
        maps = self.maps[i % self.world]
        out = {}
        for k, (_, dt) in self.fields.items():
            raw = torch.from_numpy(np.array(maps[k][i // self.world]))
            out[k] = raw.view(dt)
        return out

    def get(self, text: str) -> dict[str, Tensor] | None:
        i = self.find(text)
        return None if i is None else self.row(i)


def open_or_build(
    root: str | os.PathLike,
    texts: Sequence[str],
    encode: Callable[[list[str]], dict[str, Tensor]],
    batch: int,
) -> EmbedStore:
    """The complete store at ``root``, built first where it is not: every process of the run
    calls this (a collective); rank r encodes texts r, r + W, ... in calls of ``batch`` texts
    (``encode(texts)``: batch-first tensors, one row per text) and writes its shard; rank 0
    then writes the index. ``root`` must be one folder every rank sees (shared across nodes)."""
    root = Path(root)
    rank, world = distributed.rank_world()
    active = distributed.active(world)
    done = (root / "meta.json").is_file()
    if active:  # every rank takes rank 0's view, or some would wait in a barrier alone
        flag = [done]
        torch.distributed.broadcast_object_list(flag, src=0)
        done = flag[0]
    if not done:
        _build_shard(root, texts, encode, batch, rank, world)
        if active:
            distributed.barrier(world)
        if rank == 0:
            _finish(root, len(texts), world)
        if active:
            distributed.barrier(world)
    return EmbedStore(root)


def _build_shard(
    root: Path,
    texts: Sequence[str],
    encode: Callable[[list[str]], dict[str, Tensor]],
    batch: int,
    rank: int,
    world: int,
) -> None:
    """Rank ``rank``'s shard, unless a previous build left it complete."""
    final = root / f"shard-{rank}-of-{world}"
    if (final / "hashes.npy").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(final)  # a killed build's leftovers are removed, a live one's kept
    ids = range(rank, len(texts), world)
    keys = np.empty(len(ids), dtype=np.uint64)
    maps: dict[str, np.memmap] = {}
    fields: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), batch):
        chunk = [texts[i] for i in ids[start : start + batch]]
        out = encode(chunk)
        for k, v in out.items():
            v = v[: len(chunk)].detach().to("cpu").contiguous()
            if k not in maps:
                fields[k] = {"shape": list(v.shape[1:]), "dtype": str(v.dtype)}
                maps[k] = np.memmap(
                    tmp / f"{k}.bin",
                    dtype=_RAW[v.element_size()],
                    mode="w+",
                    shape=(len(ids), *v.shape[1:]),
                )
            maps[k][start : start + len(chunk)] = v.view(_INT[v.element_size()]).numpy()
        keys[start : start + len(chunk)] = [text_key(t) for t in chunk]
    for m in maps.values():
        m.flush()
    del maps
    (tmp / "fields.json").write_text(json.dumps(fields, sort_keys=True))
    np.save(tmp / "hashes.npy", keys)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _finish(root: Path, n: int, world: int) -> None:
    """Rank 0: the index over every shard, then ``meta.json`` (the store is complete)."""
    keys, rows, fields = [], [], None
    for r in range(world):
        shard = root / f"shard-{r}-of-{world}"
        if not (shard / "hashes.npy").is_file():
            raise UserError(
                f"embedding cache {root}: shard {r} of {world} is missing after the build; "
                "backbone.embed_cache_dir must be a folder every process can read (shared "
                "across nodes)"
            )
        h = np.load(shard / "hashes.npy")
        keys.append(h)
        rows.append(np.arange(r, n, world, dtype=np.int64)[: len(h)])
        fields = fields or json.loads((shard / "fields.json").read_text())
    k, i = np.concatenate(keys), np.concatenate(rows)
    order = np.lexsort((i, k))  # by key, then by row: the first occurrence of a text first
    k, i = k[order], i[order]
    first = np.ones(len(k), dtype=bool)
    first[1:] = k[1:] != k[:-1]
    with atomic_path(root / "index.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.stack([k[first], i[first].astype(np.uint64)]))
    for stale in root.glob("shard-*-of-*"):  # shards of an earlier build with another count
        if not stale.name.endswith(f"-of-{world}"):
            shutil.rmtree(stale, ignore_errors=True)
    atomic_write_json(root / "meta.json", {"n": n, "world": world, "fields": fields or {}})
