"""Teacher ODE samples as training data, stored compactly and cached on disk.

DMD's regression pairs and consistency distillation's clean latents (on backbones without
real data) are the teacher's deterministic Euler samples for random training prompts. A
set of them is three small columns per sample, not tensors of conditioning and noise:

- the **prompt index** into ``backbone.prompts("train")``: the condition is re-encoded per
  batch (``backbone.encode`` caches embeddings per prompt text, so a repeated prompt costs a
  lookup), instead of keeping one [333, 4096] embedding per sample for SD3;
- the **noise seed**: the initial noise is regenerated on demand with
  :func:`cdmbench.flow.seeded_noise`, instead of being stored;
- the teacher's **x0**, on the CPU in the backbone's dtype (bf16 on GPU for the image
  backbones, float32 on ``digits``/CPU, where the stored samples are exact).

Prompt indices and seeds are functions of (run seed, sample index) alone, through
:func:`cdmbench.flow.sample_seed` in a namespace of their own (so training noise never
coincides with evaluation noise, which uses the prompt id itself). Sample ``i`` is the same
whatever the set's size, the batch, the number of processes or the process: every rank
holds identical data. Under several processes each rank generates its share of the chunks
and the chunks are all-gathered; chunks lie on a fixed grid of sample indices, so every
sample is computed in the same batch whatever the world size.

How many samples a run makes is the method's setting; left unset, :func:`run_sample_count`
sizes it from the run: as many as the run can draw (iterations x draws per step x
processes), at most :data:`MAX_SAMPLES`, so a short run does not first generate thousands.

A finished (or partly finished) set is saved under the run directory's parent as
``teacher-samples-<key>.safetensors``, the key a hash of everything that determines the
samples: backbone and its generation settings, a fingerprint of the teacher's weights, the
prompt list, sigmas, guidance, storage dtype and seed, but not the count. A later run with
the same teacher settings (a resume, another method, a larger count) reads the file, takes
the prefix it needs and generates only what is missing. Long generations save their
progress periodically, so an interrupted one continues where it stopped. The file is
written atomically and carries a hash of its contents; a file that fails any check is
regenerated with a warning, since it holds nothing that cannot be recomputed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cdmbench import compute, distributed, flow
from cdmbench.backbones.base import Backbone, Cond
from cdmbench.io import atomic_path, module_sha256
from cdmbench.prompts_io import Prompt

if TYPE_CHECKING:
    from cdmbench.training.method import Core

FORMAT = 1  # bump when the file layout or the meaning of a key field changes
PREFIX = "teacher-samples-"
META_KEY = "cdmbench.teacher_samples"
CHUNK_ELEMENTS = 1 << 22  # latent elements per teacher call: 256 digits, 16 SD3-1024 latents
SAVE_EVERY_S = 600.0  # progress of a long generation is saved at most this often
MAX_SAMPLES = 10_000  # teacher samples a run makes when its method leaves the count unset

Progress = Callable[[int, int], None]  # (samples done, samples to generate)


@dataclass
class TeacherSamples:
    """``n`` teacher samples: prompt index, noise seed and x0 per sample (see module doc).

    ``batch(idx)`` returns (noise, conditions, x0) of the selected samples on ``device``,
    noise and x0 in float32.
    """

    backbone: Backbone
    prompts: Sequence[Prompt]  # the training prompts (a file may be read on demand)
    prompt_index: Tensor  # [n] int64, CPU
    seeds: Tensor  # [n] int64, CPU (63-bit per-sample seeds)
    x0: Tensor  # [n, *latent_shape], CPU, storage dtype
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    meta: dict[str, Any] = field(
        default_factory=dict
    )  # the cache key's contents (where a cache is kept)
    path: Path | None = None  # the cache file, where there is one
    generated: int = 0  # how many samples this process's build generated (the rest were read)

    def __len__(self) -> int:
        return self.x0.shape[0]

    def draw(self, k: int, generator: torch.Generator) -> Tensor:
        """``k`` sample indices, uniform with replacement, kept on the host where the samples
        are (moving them to the device and back would cost a sync per step)."""
        return torch.randint(0, len(self), (k,), generator=generator)

    def _rows(self, idx: Tensor | Sequence[int]) -> Tensor:
        return torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()

    def noise(self, idx: Tensor | Sequence[int]) -> Tensor:
        """The initial noise of the selected samples, regenerated from their seeds."""
        seeds = self.seeds[self._rows(idx)].tolist()
        return flow.seeded_noise(self.backbone.latent_shape, seeds, device=self.device)

    def cond(self, idx: Tensor | Sequence[int]) -> Cond:
        """The selected samples' conditions, encoded from their prompts."""
        rows = self.prompt_index[self._rows(idx)].tolist()
        return self.backbone.encode([self.prompts[i] for i in rows]).to(self.device)

    def targets(self, idx: Tensor | Sequence[int]) -> Tensor:
        """The teacher's x0 of the selected samples, float32 on the device."""
        return self.x0[self._rows(idx)].to(self.device, torch.float32)

    def batch(self, idx: Tensor | Sequence[int]) -> tuple[Tensor, Cond, Tensor]:
        """(noise, conditions, x0) of the selected samples, on the device."""
        return self.noise(idx), self.cond(idx), self.targets(idx)

    @classmethod
    def for_trainer(
        cls,
        core: Core,
        per_step: int,
        count: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        chunk: int | None = None,
        progress: Progress | None = None,
    ) -> TeacherSamples:
        """The set a training run needs, :func:`run_sample_count` samples (``count``, or as
        many as the run draws at ``per_step`` per iteration and process): the core's teacher,
        seed, device and processes, cached beside the run directory (``runs/<backbone>/``).
        Its cost enters the run's compute (``core.data_cost["teacher_samples"]``) whether it
        was generated or read; a set sized by the run records its samples per iteration
        (``per_iter``: a shorter run makes fewer)."""
        n = run_sample_count(core, per_step, count)
        samples = build_teacher_samples(
            core.backbone,
            core.teacher,
            n,
            seed=core.config.seed,
            steps=steps,
            guidance=guidance,
            device=core.device,
            cache_dir=Path(core.run_dir).parent,
            rank=core.rank,
            world=core.world,
            chunk=chunk,
            progress=progress,
        )
        cost = samples.cost(core.teacher, steps, guidance)
        if count is None:
            cost["per_iter"] = per_step * core.world
        core.data_cost["teacher_samples"] = cost
        return samples

    def cost(
        self, teacher: nn.Module, steps: int | None = None, guidance: float | None = None
    ) -> dict[str, float]:
        """What making the whole set costs: {samples, teacher_nfe, flops}, from one Euler step
        of its first sample measured as the training core measures a call."""
        bb = self.backbone
        steps = steps or bb.default_teacher_steps
        w = bb.default_teacher_guidance if guidance is None else guidance
        x, cond = self.noise([0]), self.cond([0])
        s = torch.ones(1, device=self.device)
        rows, flops = compute.call_cost(teacher, lambda: bb.velocity(teacher, x, s, cond, w))
        calls = len(self) * steps
        return {"samples": len(self), "teacher_nfe": calls * rows, "flops": float(calls * flops)}


# ---------------------------------------------------------------------- what a sample is
def run_sample_count(core: Core, per_step: int, count: int | None = None) -> int:
    """Teacher samples a run makes: ``count`` when set, else as many as the run draws,
    iterations x ``per_step`` x processes, at most :data:`MAX_SAMPLES`."""
    if count is not None:
        return count
    return max(1, min(MAX_SAMPLES, core.config.iters * per_step * core.world))


def prompt_indices(seed: int, n_prompts: int, n: int) -> list[int]:
    """Prompt of sample i: uniform over the prompts (with replacement), from (seed, i) alone."""
    if n_prompts < 1:
        raise ValueError("the backbone has no training prompts to draw teacher samples for")
    return [flow.sample_seed(seed, "teacher-samples/prompt", i) % n_prompts for i in range(n)]


def noise_seeds(seed: int, prompts: Sequence[Prompt], index: Sequence[int]) -> list[int]:
    """Noise seed of sample i, from (seed, its prompt id, i) in the teacher-samples namespace."""
    return [
        flow.sample_seed(seed, f"teacher-samples/{prompts[p].id}", i) for i, p in enumerate(index)
    ]


def default_chunk(backbone: Backbone) -> int:
    """Samples per teacher call: 256 for small latents, fewer for large ones (16 at SD3 1024 px)."""
    numel = 1
    for d in backbone.latent_shape:
        numel *= int(d)
    return max(1, min(256, CHUNK_ELEMENTS // max(numel, 1)))


def storage_dtype(backbone: Backbone) -> torch.dtype:
    """The backbone's dtype (bf16 on GPU for the image backbones); float32 for anything else."""
    return (
        backbone.dtype
        if backbone.dtype in (torch.float32, torch.bfloat16, torch.float16)
        else torch.float32
    )


def cache_meta(
    backbone: Backbone,
    teacher: nn.Module,
    seed: int,
    sigmas: Sequence[float],
    guidance: float,
    dtype: torch.dtype,
    prompts: Sequence[Prompt],
) -> dict[str, Any]:
    """Everything that determines sample i (the count excepted): the cache key's contents.
    A prompt file read on demand is named by its format, name and content hash (which fix
    its ids and texts) rather than read whole."""
    file_sha = getattr(prompts, "sha256", None)
    if file_sha is not None:
        listing = json.dumps(["file", prompts.fmt, prompts.name, file_sha])
    else:
        listing = json.dumps([[p.id, p.text, p.label] for p in prompts])
    meta = {
        "format": FORMAT,
        "backbone": backbone.name,
        "settings": backbone.generation_settings(),
        "teacher_sha256": module_sha256(
            teacher
        ),  # what it computes, however its weights were named
        "prompts_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "n_prompts": len(prompts),
        "sampler": "euler",
        "sigmas": [float(s) for s in sigmas],
        "steps": len(sigmas) - 1,
        "guidance": float(guidance),
        "dtype": str(dtype).removeprefix("torch."),
        "seed": int(seed),
    }
    return json.loads(
        json.dumps(meta, default=str)
    )  # as it reads back from a file (tuples as lists)


def cache_key(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ on disk
def _data_sha256(x0: Tensor, index: Tensor, seeds: Tensor) -> str:
    h = hashlib.sha256()
    for t in (x0, index, seeds):
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_samples(
    path: Path, x0: Tensor, index: Tensor, seeds: Tensor, meta: dict[str, Any]
) -> None:
    """Write a set atomically; its metadata is the key, the count and a hash of the tensors."""
    from safetensors.torch import save_file

    x0, index, seeds = x0.contiguous(), index.contiguous(), seeds.contiguous()
    header = {**meta, "n": len(x0), "data_sha256": _data_sha256(x0, index, seeds)}
    with atomic_path(path) as tmp:
        save_file(
            {"x0": x0, "prompt_index": index, "seed": seeds},
            str(tmp),
            metadata={META_KEY: json.dumps(header, sort_keys=True)},
        )


def load_samples(
    path: Path,
    meta: dict[str, Any],
    index: Tensor,
    seeds: Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> Tensor | None:
    """The x0 of a cached set's first ``min(n_file, len(index))`` samples, or None.

    None when there is no file; a warning and None when the file is unreadable or fails a
    check (key, shapes, data hash, the per-sample prompt indices and seeds it must share with
    this set): the caller regenerates and overwrites it.
    """
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[META_KEY])
            x0, idx, sd = f.get_tensor("x0"), f.get_tensor("prompt_index"), f.get_tensor("seed")
        problem = _check(header, meta, x0, idx, sd, index, seeds, shape, dtype)
    except Exception as e:  # any unreadable file is a cache miss: its contents can be recomputed
        problem = f"unreadable ({type(e).__name__})"
    if problem:
        warnings.warn(
            f"teacher-sample cache {path} is {problem}; regenerating it",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    m = min(len(x0), len(index))
    return x0[:m] if m == len(x0) else x0[:m].clone()


def _check(
    header: dict,
    meta: dict,
    x0: Tensor,
    idx: Tensor,
    sd: Tensor,
    index: Tensor,
    seeds: Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> str:
    """What is wrong with a loaded set ('' when nothing)."""
    if {k: header.get(k) for k in meta} != meta:
        return "for other teacher settings"
    n = header.get("n")
    if x0.dtype != dtype or tuple(x0.shape) != (n, *shape) or idx.shape != (n,) or sd.shape != (n,):
        return "malformed"
    if header.get("data_sha256") != _data_sha256(x0, idx, sd):
        return "corrupt (hash mismatch)"
    m = min(n, len(index))
    if not (torch.equal(idx[:m], index[:m]) and torch.equal(sd[:m], seeds[:m])):
        return "inconsistent with its key"
    return ""


# ----------------------------------------------------------------------------- building
class _StderrProgress:
    """One line on stderr at most every ``every`` seconds: silent for fast generations."""

    def __init__(self, label: str, every: float = 30.0) -> None:
        self.label, self.every = label, every
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < self.every:
            return
        if done >= total and self.last == self.t0:
            return  # finished before the first report was due
        self.last = now
        left = ""
        if 0 < done < total:
            secs = (total - done) * (now - self.t0) / done
            left = (
                f", about {secs / 60:.0f} min left" if secs >= 90 else f", about {secs:.0f} s left"
            )
        print(f"{self.label}: {done}/{total} generated{left}", file=sys.stderr, flush=True)


def _comm_device(device: torch.device) -> torch.device:
    """Where collectives run: NCCL needs CUDA tensors, gloo takes CPU ones."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


@torch.no_grad()
def build_teacher_samples(
    backbone: Backbone,
    teacher: nn.Module,
    n: int,
    *,
    seed: int,
    steps: int | None = None,
    guidance: float | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    rank: int = 0,
    world: int = 1,
    chunk: int | None = None,
    progress: Progress | None = None,
    save_every: float = SAVE_EVERY_S,
) -> TeacherSamples:
    """``n`` teacher Euler samples at ``steps`` (backbone default) and CFG ``guidance``
    (backbone default), read from ``cache_dir`` where a cached set covers them.

    Collective under several processes (every rank calls it): rank 0 reads and writes the
    cache and broadcasts what it read, the missing samples are generated in shards and
    all-gathered, so every rank returns the same set.
    """
    bb, device = backbone, torch.device(device)
    steps = steps or bb.default_teacher_steps
    w = bb.default_teacher_guidance if guidance is None else guidance
    sigmas = flow.uniform_schedule(steps, bb.shift)
    dtype = storage_dtype(bb)
    shape = tuple(int(d) for d in bb.latent_shape)
    chunk = chunk or default_chunk(bb)
    prompts = bb.prompts("train")
    index = torch.tensor(prompt_indices(seed, len(prompts), n), dtype=torch.long)
    seeds = torch.tensor(noise_seeds(seed, prompts, index.tolist()), dtype=torch.long)
    collective = distributed.active(world)
    comm = _comm_device(device) if collective else device

    meta: dict[str, Any] = {}
    path, cached = None, None
    if cache_dir is not None and rank == 0:
        meta = cache_meta(bb, teacher, seed, sigmas, w, dtype, prompts)
        path = Path(cache_dir) / f"{PREFIX}{cache_key(meta)}.safetensors"
        cached = load_samples(path, meta, index, seeds, shape, dtype)
    start = 0 if cached is None else len(cached)
    if cached is not None and start == n:
        x0 = cached
    else:
        x0 = torch.empty((n, *shape), dtype=dtype)
        if start:
            x0[:start] = cached
    del cached
    if collective:
        start = _broadcast_prefix(x0, start, comm, chunk * world)

    if progress is None and rank == 0:
        progress = _StderrProgress(
            f"teacher samples for {bb.name} ({n - start} of {n} to generate)"
        )

    def generate(lo: int, hi: int) -> Tensor:
        rows = index[lo:hi].tolist()
        cond = bb.encode([prompts[i] for i in rows]).to(device)
        noise = flow.seeded_noise(shape, seeds[lo:hi].tolist(), device=device)
        out = flow.sample(lambda x, s: bb.velocity(teacher, x, s, cond, w), noise, sigmas)
        return out.to(dtype)

    # chunks on the fixed grid [k chunk, (k + 1) chunk) of sample indices, clipped to [start, n)
    chunks = [
        (max(k * chunk, start), min((k + 1) * chunk, n))
        for k in range(start // chunk, -(-n // chunk))
    ]
    chunks = [(lo, hi) for lo, hi in chunks if lo < hi]
    last_save = time.perf_counter()
    for r in range(0, len(chunks), world):
        round_ = chunks[r : r + world]
        if collective:
            _generate_round(x0, round_, rank, world, chunk, shape, dtype, comm, generate)
        else:
            lo, hi = round_[0]
            x0[lo:hi] = generate(lo, hi).cpu()
        done = round_[-1][1]
        if progress is not None:
            progress(done - start, n - start)
        if path is not None and done < n and time.perf_counter() - last_save > save_every:
            _save_quietly(path, x0[:done], index[:done], seeds[:done], meta)
            last_save = time.perf_counter()
    if path is not None and chunks:
        _save_quietly(path, x0, index, seeds, meta)
    generated = sum(hi - lo for lo, hi in chunks)
    return TeacherSamples(bb, prompts, index, seeds, x0, device, meta, path, generated)


def _save_quietly(
    path: Path, x0: Tensor, index: Tensor, seeds: Tensor, meta: dict[str, Any]
) -> None:
    """Save the set; a cache that cannot be written costs a warning, never the run."""
    try:
        save_samples(path, x0, index, seeds, meta)
    except OSError as e:
        warnings.warn(
            f"cannot write teacher-sample cache {path} ({e.strerror or type(e).__name__}); "
            "the samples are kept in memory only",
            RuntimeWarning,
            stacklevel=3,
        )


def _broadcast_prefix(x0: Tensor, start: int, comm: torch.device, rows: int) -> int:
    """Rank 0's count of cached samples and their x0, to every rank (in slices of ``rows``)."""
    count = torch.tensor([start], dtype=torch.long, device=comm)
    dist.broadcast(count, src=0)
    start = int(count.item())
    for lo in range(0, start, rows):
        hi = min(lo + rows, start)
        part = x0[lo:hi].to(comm)
        dist.broadcast(part, src=0)
        x0[lo:hi] = part.cpu()
    return start


def _generate_round(
    x0: Tensor,
    round_: list[tuple[int, int]],
    rank: int,
    world: int,
    chunk: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    comm: torch.device,
    generate: Callable[[int, int], Tensor],
) -> None:
    """Rank r generates the round's r-th chunk; the chunks (padded to ``chunk`` rows) are
    all-gathered into every rank's x0."""
    local = torch.zeros((chunk, *shape), dtype=dtype, device=comm)
    if rank < len(round_):
        lo, hi = round_[rank]
        local[: hi - lo] = generate(lo, hi).to(comm)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    for (lo, hi), part in zip(round_, parts, strict=False):
        x0[lo:hi] = part[: hi - lo].cpu()
