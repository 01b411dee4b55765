"""Compute accounting of a training run: network calls, teacher NFEs, samples, FLOPs, wall time.

The training core installs a :class:`ComputeMeter` on the teacher and on every model it holds
(student, EMA, and the method's auxiliary models: fake score, consistency target). The meter
counts only inside :meth:`~cdmbench.training.core.Trainer.step` (sample grids and the export
are not training compute), and writes its totals into run.json under ``"cost"``:

    forward   {model: calls}  network calls (one per call of the model's forward, whatever its
              batch: a classifier-free-guidance call that stacks [uncond; cond] is one call
              of 2B rows)
    backward  {model: calls}  forward calls made with gradients enabled whose output the
              backward pass reached (a graph that is built but not backpropagated counts none;
              one that is backpropagated twice counts two); for a call read at an inner
              block (DMD2's GAN head reads the fake score's middle features), the backward
              that reached that block's output, which runs through the layers before it only
              (under FSDP2 such a backward runs through the whole network and counts so)
    teacher_nfe  per-sample teacher evaluations: the rows of every teacher call (a CFG call of
              B samples is 2B), plus those of the data made before training (below)
    images    training samples the core drew (batch x grad_accum per iteration and process)
    flops     estimated training FLOPs: for each call, the forward FLOPs of one call at its
              input shapes (measured once per model and shape with
              ``torch.utils.flop_counter.FlopCounterMode`` on the call itself; a multiply-add is
              2 FLOPs) x 3 when it had a backward (forward + 2 x forward for the backward, the
              usual estimate), x 1 otherwise; a backward from an inner block adds 2 x the
              forward FLOPs up to that block (measured the same way, once per shape)
    wall_s    seconds in the training loop (checkpoints and logging included), over every
              session up to its last checkpoint
    iters, world  iterations done; processes of the session that finished the run

Counts are summed over processes (the data below, the whole set's, is not). Work a method
does once before training (DMD's regression pairs, CD's teacher samples on backbones without
real data) is counted as what the run's data costs to make, whether or not a cache already
held it (so a run's cost does not depend on what ran before): under ``"data"``,
{what: {samples, teacher_nfe, flops[, per_iter]}}, n samples x steps teacher calls, each
measured like a training call (``per_iter``: where the set's size follows the run's length).
``flops`` and ``teacher_nfe`` are totals, the data included; ``train_flops`` is the training
loop's alone (what scales with iterations).

The counters are plain numbers kept in the checkpoint, so a resumed run reports the total of
all its sessions. Counting is a forward hook per model call; FLOPs are measured on the first
call of each input shape only.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

COUNTERS = ("forward", "forward_rows", "backward", "backward_rows")
# which meter counts a model, and under which name (for calls read at an inner block)
_OWNERS: weakref.WeakKeyDictionary[nn.Module, tuple[ComputeMeter, str]] = (
    weakref.WeakKeyDictionary()
)
_READING: list[int] = []  # the blocks whose output the calls in progress are read at
FLOP_UNITS = ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"))


def _tensors(args: Any, kwargs: Any) -> list[Tensor]:
    leaves, _ = tree_flatten((args, kwargs))
    return [t for t in leaves if isinstance(t, Tensor)]


def _rows(tensors: list[Tensor]) -> int:
    """Samples in a call: the leading dimension of its first tensor input."""
    for t in tensors:
        if t.dim() > 0:
            return int(t.shape[0])
    return 1


def _key(name: str, tensors: list[Tensor]) -> tuple:
    """A call's identity for its FLOPs: model, the block being read (see :func:`reading`)
    and the inputs' shapes and dtypes."""
    block = _READING[-1] if _READING else None
    return (name, block, *((tuple(t.shape), t.dtype) for t in tensors))


def _in_backward() -> bool:
    """Inside the autograd engine (an activation-checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


class ComputeMeter:
    """Counts the calls of named models while active (see the module doc for definitions)."""

    def __init__(self) -> None:
        self.active = False
        self.names: list[str] = []
        self.counts: dict[str, dict[str, int]] = {}
        self.flops: dict[str, float] = {}
        self.images = 0
        self.data: dict[str, dict[str, float]] = {}  # work done before training (module doc)
        # totals of earlier sessions, already summed over processes (from the checkpoint)
        self.base: dict[str, Any] = {}
        self.wall_base = 0.0
        self._t0: float | None = None
        # (model, block read, input shapes) -> forward FLOPs
        self._call_flops: dict[tuple, int] = {}
        self._measuring: tuple[tuple, Any] | None = None
        self._partial_flops: dict[tuple, int] = {}  # call key -> forward FLOPs up to its block
        self._last_key: dict[str, tuple] = {}  # each model's latest counted call
        self._handles: list[Any] = []

    # ------------------------------------------------------------------------- install
    def install(self, models: Mapping[str, nn.Module]) -> None:
        """Hook every model of ``models`` (a module held under two names is counted under the
        first)."""
        seen: set[int] = set()
        for name, model in models.items():
            self.names.append(name)
            self.counts[name] = dict.fromkeys(COUNTERS, 0)
            self.flops[name] = 0.0
            if id(model) in seen:
                continue
            seen.add(id(model))
            _OWNERS[model] = (self, name)
            pre, post = self._hooks(name)
            self._handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(model.register_forward_hook(post, with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for model in [m for m, (meter, _) in _OWNERS.items() if meter is self]:
            del _OWNERS[model]

    def _backward_hook(self, name: str, rows: int, flops: float) -> Callable[[Tensor], None]:
        """A tensor hook that counts one backward of ``name`` costing ``flops``."""
        c = self.counts[name]

        def on_backward(grad: Tensor) -> None:
            c["backward"] += 1
            c["backward_rows"] += rows
            self.flops[name] += flops

        return on_backward

    def _hooks(self, name: str):
        # closures, not bound methods: a deep copy of a hooked model (a clone) must not copy
        # the meter
        meter = self

        def pre(module: nn.Module, args: Any, kwargs: Any) -> None:
            if not meter.active or _in_backward():
                return
            key = _key(name, _tensors(args, kwargs))
            if key not in meter._call_flops and meter._measuring is None:
                from torch.utils.flop_counter import FlopCounterMode

                mode = FlopCounterMode(display=False)
                mode.__enter__()
                meter._measuring = (key, mode)

        def post(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if not meter.active or _in_backward():
                return
            tensors = _tensors(args, kwargs)
            key = _key(name, tensors)
            if meter._measuring is not None and meter._measuring[0] == key:
                mode = meter._measuring[1]
                meter._measuring = None
                mode.__exit__(None, None, None)
                meter._call_flops[key] = mode.get_total_flops()
            flops = meter._call_flops.get(key, 0)
            rows = _rows(tensors)
            c = meter.counts[name]
            c["forward"] += 1
            c["forward_rows"] += rows
            meter.flops[name] += flops
            meter._last_key[name] = key
            out = next((t for t in tree_flatten(output)[0] if isinstance(t, Tensor)), None)
            if out is not None and out.requires_grad and torch.is_grad_enabled():
                # the backward: twice the forward
                out.register_hook(meter._backward_hook(name, rows, 2 * flops))

        return pre, post

    def block_reached(self, name: str) -> None:
        """The block read by ``name``'s call in progress has run: where that call is being
        measured, its FLOPs so far are the cost of the layers a backward from the block
        runs through."""
        if self._measuring is not None and self._measuring[0][0] == name:
            key, mode = self._measuring
            self._partial_flops.setdefault(key, mode.get_total_flops())

    def inner_backward(self, name: str, out: Tensor) -> None:
        """Count the backward that enters ``name``'s latest call at ``out``, the output of the
        inner block it read: 2 x the forward FLOPs up to that block."""
        key = self._last_key.get(name)
        if not self.active or key is None or not out.requires_grad or not torch.is_grad_enabled():
            return
        flops = self._partial_flops.get(key, 0)  # 0 where the call could not be measured
        rows = int(out.shape[0]) if out.dim() else 1
        out.register_hook(self._backward_hook(name, rows, 2 * flops))

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count the calls made inside (the core wraps each training iteration)."""
        self.active = True
        try:
            yield
        finally:
            self.active = False
            if self._measuring is not None:  # a call that raised: measure again next time
                self._measuring[1].__exit__(None, None, None)
                self._measuring = None

    def add_images(self, n: int) -> None:
        self.images += int(n)

    def add_data(
        self,
        what: str,
        samples: int,
        teacher_nfe: int,
        flops: float,
        per_iter: int | None = None,
    ) -> None:
        """The cost of the data a run makes before training (the same on every process: it
        is the whole set's, not summed over processes; made again by ``build`` on resume, so
        not kept in the checkpoint). ``per_iter``: samples per iteration where the set's
        size follows the run's length (up to a cap)."""
        self.data[what] = {
            "samples": int(samples),
            "teacher_nfe": int(teacher_nfe),
            "flops": float(flops),
        } | ({"per_iter": int(per_iter)} if per_iter else {})

    # ---------------------------------------------------------------------- wall time
    def start_clock(self) -> None:
        self.stop_clock()
        self._t0 = time.perf_counter()

    def stop_clock(self) -> None:
        if self._t0 is not None:
            self.wall_base += time.perf_counter() - self._t0
            self._t0 = None

    def wall_s(self) -> float:
        running = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        return self.wall_base + running

    # ------------------------------------------------------------------------- totals
    def totals(self, world: int = 1, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Every counter summed over processes and sessions, as plain numbers (a collective
        under several processes: every rank must call it). The checkpoint keeps this."""
        ints = [self.counts[n][k] for n in self.names for k in COUNTERS] + [self.images]
        floats = [self.flops[n] for n in self.names]
        if world > 1:
            ti = torch.tensor(ints, dtype=torch.int64, device=device)
            tf = torch.tensor(floats, dtype=torch.float64, device=device)
            dist.all_reduce(ti)
            dist.all_reduce(tf)
            ints, floats = ti.tolist(), tf.tolist()
        out: dict[str, Any] = {k: {} for k in COUNTERS}
        i = 0
        for n in self.names:
            for k in COUNTERS:
                out[k][n] = int(ints[i]) + int(self.base.get(k, {}).get(n, 0))
                i += 1
        out["images"] = int(ints[i]) + int(self.base.get("images", 0))
        out["flops"] = {
            n: float(f) + float(self.base.get("flops", {}).get(n, 0.0))
            for n, f in zip(self.names, floats, strict=True)
        }
        for k in (*COUNTERS, "flops"):  # a model of an earlier session that this one lacks
            for n, v in self.base.get(k, {}).items():
                out[k].setdefault(n, v)
        out["wall_s"] = float(self.wall_s())
        return out

    def load_totals(self, saved: Mapping[str, Any] | None) -> None:
        """Continue from :meth:`totals` of a checkpoint (None: an older checkpoint without
        them; counting starts at 0). This session's own counts restart at 0."""
        saved = dict(saved or {})
        self.base = {k: dict(saved.get(k, {})) for k in (*COUNTERS, "flops")}
        self.base["images"] = int(saved.get("images", 0))
        self.wall_base = float(saved.get("wall_s", 0.0))
        for n in self.names:
            self.counts[n] = dict.fromkeys(COUNTERS, 0)
            self.flops[n] = 0.0
        self.images = 0

    def cost(self, iters: int, world: int = 1, device: torch.device | str = "cpu") -> dict:
        """run.json's ``"cost"`` (a collective under several processes)."""
        t = self.totals(world, device)
        train = float(sum(t["flops"].values()))
        data = {k: dict(v) for k, v in sorted(self.data.items())}
        return {
            "flops": train + sum(d["flops"] for d in data.values()),
            "train_flops": train,
            "data": data,
            "wall_s": round(t["wall_s"], 3),
            "images": t["images"],
            "teacher_nfe": int(t["forward_rows"].get("teacher", 0))
            + sum(int(d["teacher_nfe"]) for d in data.values()),
            "forward": t["forward"],
            "backward": t["backward"],
            "iters": int(iters),
            "world": int(world),
        }


# ------------------------------------------------------------------ calls outside the hooks
@contextlib.contextmanager
def reading(model: nn.Module, block: nn.Module) -> Iterator[Callable[[Tensor], None]]:
    """Around one call of ``model`` whose output that matters is ``block``'s (DMD2's GAN
    features): the call counts as a forward of ``model``, its FLOPs are measured under a key
    of their own (with those up to the block), and the function yielded, given the block's
    output that the loss reads, counts the backward entering there. Where no meter counts
    ``model``, nothing is counted."""
    owner = _OWNERS.get(model)
    if owner is None:
        yield lambda out: None
        return
    meter, name = owner
    handle = block.register_forward_hook(lambda *_: meter.block_reached(name))
    _READING.append(id(block))
    try:
        yield lambda out: meter.inner_backward(name, out)
    finally:
        _READING.pop()
        handle.remove()


def call_cost(model: nn.Module, run: Callable[[], Any]) -> tuple[int, int]:
    """(rows of the calls of ``model``, forward FLOPs of all of ``run()``) without gradients,
    rows as the meter counts them (``run`` should call little besides ``model``)."""
    from torch.utils.flop_counter import FlopCounterMode

    rows = 0

    def pre(_m: nn.Module, args: Any, kwargs: Any) -> None:
        nonlocal rows
        rows += _rows(_tensors(args, kwargs))

    mode = FlopCounterMode(display=False)
    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad(), mode:
            run()
    finally:
        handle.remove()
    return rows, mode.get_total_flops()


# ----------------------------------------------------------------------------- display
def human_flops(flops: float | None, digits: int = 2) -> str:
    """FLOPs as a reader scans them: "1.2 PFLOP", "350 GFLOP", "-" for none."""
    if flops is None or flops != flops or flops <= 0:
        return "-"
    value, unit = flops, "FLOP"
    for scale, name in FLOP_UNITS:
        if flops >= scale:
            value, unit = flops / scale, name
            break
    return f"{value:.0f} {unit}" if value >= 10**digits else f"{value:.{digits}g} {unit}"


def human_seconds(s: float | None) -> str:
    """Wall time as "42 s", "3.5 min", "2.1 h"."""
    if s is None or s != s or s < 0:
        return "-"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def format_cost(cost: Mapping[str, Any] | None) -> str:
    """One line for a run's ``"cost"``: FLOPs, teacher NFEs, images, wall time and calls per
    model; "-" for a run without one (the teacher, runs trained before accounting)."""
    if not cost:
        return "-"
    calls = ", ".join(
        f"{m} {n}/{cost.get('backward', {}).get(m, 0)}"
        for m, n in cost.get("forward", {}).items()
        if n
    )
    return (
        f"{human_flops(cost.get('flops'))}, {cost.get('teacher_nfe', 0):,} teacher NFE, "
        f"{cost.get('images', 0):,} images, {human_seconds(cost.get('wall_s'))}"
        + (f" (fwd/bwd: {calls})" if calls else "")
    )
