"""Teacher samples as training data (cdmbench.training.teacher_data): compact layout, noise
from seeds, the on-disk cache (reuse, growth, interruption, corruption), identical data on
every process, and DMD / CD training on tiny-sd3 through it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cdmbench import flow
from cdmbench.backbones.digits import Digits
from cdmbench.config import resolve
from cdmbench.registry import METHODS
from cdmbench.training.run import train_run
from cdmbench.training.teacher_data import TeacherSamples, build_teacher_samples

N, STEPS, SEED = 40, 3, 5  # small digits sets: 3 Euler steps at CFG 2


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits()


@pytest.fixture(scope="module")
def teacher(digits):
    return digits.load_teacher()


class Counting(torch.nn.Module):
    """A teacher wrapper that counts the samples it is called on."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows = 0

    def forward(self, x, t, y):
        self.rows += x.shape[0]
        return self.inner(x, t, y)


def _build(bb, teacher, n: int = N, cache_dir: Path | None = None, **kw) -> TeacherSamples:
    kw = {"seed": SEED, "steps": STEPS, "guidance": 2.0, "chunk": 16} | kw
    return build_teacher_samples(bb, teacher, n, cache_dir=cache_dir, **kw)


def _same(a: TeacherSamples, b: TeacherSamples) -> bool:
    return (
        torch.equal(a.x0, b.x0)
        and torch.equal(a.seeds, b.seeds)
        and torch.equal(a.prompt_index, b.prompt_index)
    )


def _cache_file(folder: Path) -> Path:
    (path,) = folder.glob("teacher-samples-*.safetensors")
    return path


# ------------------------------------------------------------------------ what is held
def test_layout_is_three_compact_columns_on_the_cpu(digits, teacher):
    data = _build(digits, teacher)
    assert len(data) == N and data.generated == N
    assert data.prompt_index.shape == data.seeds.shape == (N,)
    assert data.prompt_index.dtype == data.seeds.dtype == torch.int64
    assert data.x0.shape == (N, 1, 8, 8) and data.x0.dtype == digits.dtype == torch.float32
    for t in (data.prompt_index, data.seeds, data.x0):
        assert t.device.type == "cpu"
    # nothing else per sample: no conditioning rows, no noise
    tensors = [v for v in vars(data).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in tensors) == N * (64 + 2)
    assert len(data.prompts) == 10 and set(data.prompt_index.tolist()) <= set(range(10))
    assert len(set(data.prompt_index.tolist())) > 5  # drawn, not one prompt


def test_noise_is_regenerated_from_the_seeds_and_x0_is_the_teacher_sample(digits, teacher):
    data = _build(digits, teacher)
    idx = torch.tensor([0, 7, 7, 39, 12])
    noise, cond, x0 = data.batch(idx)
    prompts = [data.prompts[i] for i in data.prompt_index[idx].tolist()]
    seeds = [
        flow.sample_seed(SEED, f"teacher-samples/{p.id}", i)
        for p, i in zip(prompts, idx.tolist(), strict=True)
    ]
    assert data.seeds[idx].tolist() == seeds
    assert torch.equal(noise, flow.seeded_noise((1, 8, 8), seeds))
    assert torch.equal(cond.tensors["label"], digits.encode(prompts).tensors["label"])
    assert x0.dtype == torch.float32 and torch.equal(x0, data.x0[idx])
    # the stored x0 is the teacher's Euler sample from that noise and prompt at CFG 2
    ref = flow.sample(
        lambda x, s: digits.velocity(teacher, x, s, cond, 2.0),
        noise,
        flow.uniform_schedule(STEPS, digits.shift),
    )
    torch.testing.assert_close(x0, ref, rtol=1e-5, atol=1e-6)
    # sample i does not depend on the set's size or the chunking
    small = _build(digits, teacher, n=13, chunk=5)
    assert torch.equal(small.seeds, data.seeds[:13]) and torch.equal(
        small.prompt_index, data.prompt_index[:13]
    )
    torch.testing.assert_close(small.x0, data.x0[:13], rtol=1e-5, atol=1e-6)


def test_two_builds_with_one_seed_are_identical_and_other_seeds_differ(digits, teacher):
    a, b = _build(digits, teacher), _build(digits, teacher)
    assert _same(a, b)
    other = _build(digits, teacher, seed=SEED + 1)
    assert not torch.equal(other.seeds, a.seeds) and not torch.equal(other.x0, a.x0)


# ------------------------------------------------------------------------------ the cache
def test_second_build_reads_the_cache_instead_of_calling_the_teacher(digits, teacher, tmp_path):
    counting = Counting(teacher)
    first = _build(digits, counting, cache_dir=tmp_path)
    path = _cache_file(tmp_path)
    assert first.path == path and first.generated == N and counting.rows > 0
    assert (
        first.meta["seed"] == SEED
        and first.meta["guidance"] == 2.0
        and first.meta["steps"] == STEPS
    )
    counting.rows = 0
    again = _build(digits, counting, cache_dir=tmp_path)
    assert counting.rows == 0 and again.generated == 0 and _same(again, first)
    prefix = _build(digits, counting, n=25, cache_dir=tmp_path)  # a smaller set is a prefix
    assert counting.rows == 0 and torch.equal(prefix.x0, first.x0[:25])
    grown = _build(digits, counting, n=N + 9, cache_dir=tmp_path)  # a larger one adds the rest
    assert grown.generated == 9 and torch.equal(grown.x0[:N], first.x0)
    assert _same(_build(digits, teacher, n=N + 9), grown)
    counting.rows = 0
    assert (
        _build(digits, counting, n=N + 9, cache_dir=tmp_path).generated == 0 and counting.rows == 0
    )
    assert list(tmp_path.glob("teacher-samples-*")) == [path]  # one file, grown in place


def test_other_teacher_settings_use_another_cache_file(digits, teacher, tmp_path):
    _build(digits, teacher, cache_dir=tmp_path)
    _build(digits, teacher, cache_dir=tmp_path, guidance=1.0)
    _build(digits, teacher, cache_dir=tmp_path, steps=STEPS + 1)
    _build(digits, teacher, cache_dir=tmp_path, seed=SEED + 1)
    other = digits.load_teacher()
    with torch.no_grad():
        other.out.bias.add_(1e-3)
    changed = _build(digits, other, cache_dir=tmp_path)
    assert changed.generated == N
    assert len(list(tmp_path.glob("teacher-samples-*.safetensors"))) == 5


def _damage_data(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # inside the tensors: the header still parses
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_damage_data, "corrupt"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "unreadable"),
        (lambda p: p.write_bytes(b"not a safetensors file"), "unreadable"),
    ],
)
def test_a_damaged_cache_is_regenerated_with_a_warning(digits, teacher, tmp_path, damage, problem):
    first = _build(digits, teacher, cache_dir=tmp_path)
    path = _cache_file(tmp_path)
    damage(path)
    with pytest.warns(RuntimeWarning, match=problem):
        again = _build(digits, teacher, cache_dir=tmp_path)
    assert again.generated == N and _same(again, first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is sound
        assert _build(digits, teacher, cache_dir=tmp_path).generated == 0


def test_an_unwritable_cache_costs_a_warning_not_the_run(digits, teacher, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="cannot write"):
        data = _build(digits, teacher, cache_dir=blocker / "sub")
    assert data.generated == N and _same(data, _build(digits, teacher))


def test_an_interrupted_generation_continues_from_its_saved_progress(digits, teacher, tmp_path):
    def stop_after_two_chunks(done: int, total: int) -> None:
        if done >= 32:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(
            digits, teacher, n=N, cache_dir=tmp_path, save_every=0.0, progress=stop_after_two_chunks
        )
    assert not list(tmp_path.glob(".*.tmp"))
    resumed = _build(digits, teacher, cache_dir=tmp_path)
    assert resumed.generated == N - 16  # the first chunk was saved before the second finished
    assert _same(resumed, _build(digits, teacher))


# --------------------------------------------------------------------- several processes
WORKER = """
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from cdmbench.backbones.digits import Digits
from cdmbench.training.teacher_data import build_teacher_samples

out, seed, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
bb = Digits()
teacher = bb.load_teacher()
kw = dict(seed=seed, steps=steps, guidance=2.0, chunk=7, rank=rank, world=world, cache_dir=out / "cache")
results = {}
for name, n in (("fresh", 30), ("cached", 30), ("grown", 45)):
    data = build_teacher_samples(bb, teacher, n, **kw)
    results[name] = (data.x0, data.prompt_index, data.seeds, data.generated)
torch.save(results, out / f"rank{rank}.pt")
dist.destroy_process_group()
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_get_identical_data_equal_to_one_process(digits, teacher, tmp_path):
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), str(SEED), str(STEPS)],
            env=env | {"RANK": str(r)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # one process, the same sequence: 30 samples, then grown to 45 from its cache
    single = {
        n: _build(digits, teacher, n=n, chunk=7, cache_dir=tmp_path / "one") for n in (30, 45)
    }
    for res in ranks:
        for name, n in (("fresh", 30), ("cached", 30), ("grown", 45)):
            x0, index, seeds, _ = res[name]
            assert torch.equal(index, single[n].prompt_index) and torch.equal(
                seeds, single[n].seeds
            )
            assert torch.equal(x0, single[n].x0), name  # same chunks on the same grid: same bits
    # each rank generated its share of the chunks and holds the gathered set; the second
    # build was rank 0's cache, sent on; the third generated only the 15 missing samples
    assert [[res[k][3] for k in ("fresh", "cached", "grown")] for res in ranks] == [[30, 0, 15]] * 2
    assert len(list((tmp_path / "cache").glob("teacher-samples-*.safetensors"))) == 1


# ---------------------------------------------------------------- methods on tiny-sd3
@pytest.fixture(scope="module")
def tiny():
    from cdmbench.backbones.sd3 import TinySD3  # diffusers: imported only where needed

    return TinySD3()


@pytest.mark.parametrize(
    "method, sets", [("dmd", ["method.reg_pairs=4"]), ("cd", ["method.cache_size=4"])]
)
def test_method_trains_on_tiny_sd3_and_reuses_the_cache(tiny, tmp_path, method, sets):
    cls = METHODS.get(method)
    runs = tmp_path / "runs"

    def run(iters: int):
        train_cfg, method_cfg = resolve(cls, "tiny-sd3", None, sets, iters=iters, batch=2)
        m = cls(method_cfg)
        res = train_run(m, tiny, train_cfg, runs, sample_steps=(1,))
        return m, res

    m, res = run(2)
    data = m.reg_data if method == "dmd" else m.samples
    assert len(data) == 4 and data.generated == 4
    assert data.x0.device.type == "cpu" and data.x0.dtype == tiny.dtype
    assert data.path.parent == runs / "tiny-sd3" and data.path.is_file()
    w = m.config.real_guidance if method == "dmd" else tiny.default_teacher_guidance
    assert data.meta["guidance"] == w
    assert (res.run_dir / "run.json").is_file() and res.run_dir.parent == runs / "tiny-sd3"
    noise, cond, x0 = data.batch(torch.tensor([3, 0]))
    assert noise.shape == x0.shape == (2, 16, 8, 8)
    assert cond.tensors["prompt_embeds"].shape[0] == 2  # encoded per batch, not stored
    m2, res2 = run(3)  # another run (another directory) with the same teacher settings
    data2 = m2.reg_data if method == "dmd" else m2.samples
    assert res2.run_dir != res.run_dir and data2.generated == 0
    assert torch.equal(data2.x0, data.x0) and data2.path == data.path


# ------------------------------------------------------------- sized from the run's needs
def test_default_size_is_what_the_run_draws():
    from types import SimpleNamespace

    from cdmbench.training.teacher_data import MAX_SAMPLES, run_sample_count

    def core(iters, world=1):
        return SimpleNamespace(config=SimpleNamespace(iters=iters), world=world)

    assert run_sample_count(core(2), 4) == 8  # a 2-iteration run at batch 4
    assert run_sample_count(core(2, world=8), 4) == 64
    assert run_sample_count(core(10**6), 16) == MAX_SAMPLES
    assert run_sample_count(core(2), 4, count=100) == 100  # a set count is kept
    # digits keeps its declared sizes: DMD's 2048 pairs, and CD trains on real data
    assert METHODS.get("dmd").default_config("digits").reg_pairs == 2048
    assert METHODS.get("dmd").Config().reg_pairs is None
    assert METHODS.get("cd").Config().cache_size is None


@pytest.mark.parametrize("method", ["dmd", "cd"])
def test_short_run_makes_only_the_samples_it_draws(tiny, tmp_path, method):
    cls = METHODS.get(method)
    train_cfg, method_cfg = resolve(cls, "tiny-sd3", None, [], iters=2, batch=2)
    m = cls(method_cfg)
    train_run(m, tiny, train_cfg, tmp_path / "runs", sample_steps=(1,))
    data = m.reg_data if method == "dmd" else m.samples
    assert len(data) == data.generated == 2 * 2


def test_cd_on_digits_uses_real_data_and_no_teacher_samples(digits, tmp_path):
    cls = METHODS.get("cd")
    train_cfg, method_cfg = resolve(cls, "digits", None, [], iters=1, batch=8)
    m = cls(method_cfg)
    train_run(m, digits, train_cfg, tmp_path / "runs", sample_steps=(1,))
    assert m.samples is None and m.data is not None
    assert not list((tmp_path / "runs" / "digits").glob("teacher-samples-*"))


def test_prompt_file_samples_match_the_whole_read_and_key_by_content(digits, teacher, tmp_path):
    """A file served on demand gives the samples of the same prompts read whole; its
    cache key is the file's content hash, so an edited file is another set."""
    from cdmbench.prompts_io import PromptFile, load_prompt_set
    from cdmbench.training.teacher_data import cache_meta

    path = tmp_path / "d.txt"
    path.write_text("".join(f"a handwritten digit {d}\n" for d in (3, 1, 4, 1, 5, 9, 2, 6)))
    stream, whole = PromptFile(path), load_prompt_set(path)[1]

    class FromFile(Digits):
        def __init__(self, prompts):
            super().__init__()
            self.source = prompts

        def prompts(self, split="train"):
            return self.source

    a = build_teacher_samples(FromFile(stream), teacher, 12, seed=0, steps=4)
    b = build_teacher_samples(FromFile(whole), teacher, 12, seed=0, steps=4)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.seeds, b.seeds)
    key = cache_meta(FromFile(stream), teacher, 0, [1.0, 0.0], 1.0, torch.float32, stream)
    path.write_text(path.read_text() + "a handwritten digit 7\n")
    edited = PromptFile(path)
    key2 = cache_meta(FromFile(edited), teacher, 0, [1.0, 0.0], 1.0, torch.float32, edited)
    assert key["prompts_sha256"] != key2["prompts_sha256"]
