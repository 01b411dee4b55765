"""The one training core every distillation method plugs into.

The core owns what methods share: the frozen teacher, the student and whatever auxiliary
models a method builds (fake score, EMA target), one optimizer per group with its own
learning rate, betas, weight decay, warm-up, clipping and cadence, the student EMA,
checkpoint/resume of everything, numerical guards, logging and progress. A method only
says which models it needs, which groups to update at an iteration and what their losses
are (see :mod:`cdmbench.training.method`).

Multi-process: the core reads the usual launcher variables (``accelerate launch``,
``torchrun``), seeds the per-process generator from (seed, rank) and the shared generator
from the seed alone (so every rank draws the same schedule length), and averages gradients
across ranks after each backward. Methods run several forwards per backward, which DDP's
reducer does not support; an explicit all-reduce is exact and works with any of them.
Models too large to replicate are sharded with FSDP2 instead (``TrainConfig.shard``, see
:mod:`cdmbench.training.sharding`): FSDP2 accepts several forwards per backward and
averages the gradients itself. Checkpoints are written by every rank, each its own shards
(see :mod:`cdmbench.training.checkpoint`), and resume on any number of processes.

Gradient accumulation (``TrainConfig.grad_accum = k``): an iteration works on k micro-batches
of ``batch`` samples and is one update of batch k x batch per process. The method's
``prepare`` runs once per micro-batch, all of them before any group (each micro-batch keeps its
own state); then each scheduled group, in the method's order, backpropagates the losses of
every micro-batch scaled by 1/k into one set of gradients, and clips, steps and runs its
``after_step`` and EMA once. A later group therefore sees the earlier group's update, as with
one big batch, and the update equals the big batch's up to float32 summation order (losses are
per-sample means; no method's loss has a statistic over the batch). Draws from ``g_shared``
(a schedule length) are per iteration: every micro-batch sees the same ones, as every process
does. Under FSDP2 the gradients are reduce-scattered at each micro-batch's backward, so they
stay sharded while they accumulate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cdmbench.backbones.base import Backbone
from cdmbench.compute import ComputeMeter
from cdmbench.distributed import init_distributed, resolve_device
from cdmbench.errors import CheckpointError as CheckpointError  # re-exported
from cdmbench.errors import NonFiniteLossError as NonFiniteLossError  # re-exported
from cdmbench.errors import UserError
from cdmbench.settings import MAX_COUNT, as_dict, setting
from cdmbench.training import checkpoint, sharding
from cdmbench.training.checkpoint import Preempted
from cdmbench.training.logging import (
    SAMPLE_PROMPTS,
    TRACKERS,
    RunLogger,
    check_tracker,
    periodic_samples,
)
from cdmbench.training.method import Batch, Method, OptimSpec, config_to_dict

OPTIMIZERS = ("adamw", "adamw8bit")
MAX_BATCH = 1 << 20  # samples per process and micro-batch; more is a typo, not a run
MAX_SEED = 2**31 - 1  # seeds derive per-rank and per-sample seeds from it


def device_problem(device: str) -> str | None:
    """What is wrong with ``device`` as a training device (cpu, cuda, cuda:N present here)."""
    if str(device).strip().lower() == "auto":
        return "use cpu, cuda or cuda:N (the command line's --device resolves auto)"
    try:
        resolve_device(device)
    except UserError as e:
        return str(e)
    return None


@dataclass
class TrainConfig:
    """Settings the core owns; methods have their own dataclass for theirs."""

    # training iterations (each may update several groups)
    iters: int = setting(1000, ge=1, le=MAX_COUNT)
    batch: int = setting(16, ge=1, le=MAX_BATCH)  # per process
    seed: int = setting(0, ge=0, le=MAX_SEED)
    ema_cap: float = setting(0.999, ge=0, le=1)  # student EMA decay min((1+k)/(10+k), ema_cap)
    log_every: int = setting(10, hashed=False, ge=1)  # JSONL log cadence, iterations
    # tracker beside log.jsonl: "tensorboard" (when installed), "wandb" or "none"
    log_to: str = setting("tensorboard", hashed=False, choices=TRACKERS)
    sample_every: int = setting(0, hashed=False, ge=0)  # sample-grid cadence, iterations; 0: off
    ckpt_every: int = setting(250, hashed=False, ge=1)  # checkpoint cadence, iterations
    # "stop": raise and keep the last good checkpoint; "skip": skip the step
    on_nan: str = setting("stop", hashed=False, choices=("stop", "skip"))
    device: str = setting("cpu", hashed=False, check=device_problem)  # cpu, cuda or cuda:N
    threads: int = setting(0, hashed=False, ge=0, le=4096)  # torch CPU threads; 0: torch's default
    # "none", "fsdp2", or "auto": fsdp2 under `accelerate launch` with FSDP2; the same updates
    shard: str = setting("auto", hashed=False, choices=sharding.SHARD_MODES)
    # micro-batches per update: the effective batch is batch x this x world
    grad_accum: int = setting(1, ge=1, le=MAX_COUNT)
    # AdamW in 32-bit, or bitsandbytes' 8-bit AdamW (a quarter of the optimizer-state memory)
    optimizer: str = setting("adamw", choices=OPTIMIZERS)
    # seconds a collective may wait for the slowest process (NCCL/gloo) before the run fails
    dist_timeout_s: float = setting(1800.0, hashed=False, gt=0)
    # seconds to wait while another process trains the same configuration, then stop with a
    # message; negative: wait until it has finished, then reuse its run
    lock_wait_s: float = setting(-1.0, hashed=False)

    keep_last: int = setting(1, hashed=False, ge=1)  # checkpoints kept: the latest k (roll back)
    keep_every: int = setting(0, hashed=False, ge=0)  # ... and every N iterations' (0: none)
    export_dtype: str = setting(
        "float32", hashed=False, choices=("float32", "bfloat16")
    )  # of student.safetensors; bf16 halves it, eval loads it into the backbone's dtype

    def __post_init__(self) -> None:
        sharding.check_shard_mode(self.shard)
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise UserError(
                f"train.grad_accum must be a whole number >= 1, got {self.grad_accum!r}"
            )
        if self.optimizer == "adamw8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise UserError(
                    "train.optimizer=adamw8bit needs bitsandbytes (the adam8bit extra): "
                    "pip install bitsandbytes"
                ) from None
        if not isinstance(self.sample_every, int) or self.sample_every < 0:
            raise UserError(
                f"train.sample_every must be a whole number >= 0, got {self.sample_every!r}"
            )
        check_tracker(self.log_to)
        if self.keep_last < 1 or self.keep_every < 0:
            raise UserError(
                f"train.keep_last must be >= 1 and train.keep_every >= 0, got "
                f"{self.keep_last} and {self.keep_every}"
            )


def ema_decay(k: int, cap: float = 0.999) -> float:
    """Warm-started EMA decay min((1 + k) / (10 + k), cap) after k updates."""
    return min((1 + k) / (10 + k), cap)


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, decay: float) -> None:
    """theta_t = decay * theta_t + (1 - decay) * theta_s, over parameters (buffers are not averaged).

    Sharded models are averaged shard by shard: the core shards every model the same way,
    so each rank's shards of target and source hold the same elements and the local lerp
    is the whole update.
    """
    tp = [sharding.local(p) for p in target.parameters()]
    sp = [sharding.local(p.detach()) for p in source.parameters()]
    torch._foreach_lerp_(tp, sp, 1.0 - decay)


def merge_(target: nn.Module, source: nn.Module, alpha: float) -> None:
    """theta_t = (1 - alpha) theta_t + alpha theta_s (CDM merges the student into the fake score)."""
    ema_update_(target, source, 1.0 - alpha)


class Trainer:
    """Runs a method on a backbone; everything it holds is checkpointed.

    Provides the :class:`~cdmbench.training.method.Core` interface methods are given.
    """

    def __init__(
        self,
        backbone: Backbone,
        method: Method,
        config: TrainConfig,
        run_dir: str | Path,
        teacher_weights: str | None = None,
        log: Callable[[dict], None] | None = None,
    ) -> None:
        self.backbone = backbone
        self.method = method
        self.config = config
        self.run_dir = Path(run_dir)
        self.teacher_weights = teacher_weights
        self.rank, self.world = init_distributed(config.device, config.dist_timeout_s)
        self.sharded = sharding.resolve_shard(
            config.shard, self.world
        )  # before loading any weights
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device)
        samples = list(backbone.prompts("test"))[:SAMPLE_PROMPTS] if config.sample_every else []
        backbone.prepare_embeddings(self.run_dir.parent / "embeddings", samples)
        torch.manual_seed(config.seed)  # module initialisers a method may call in build()
        self.g = torch.Generator().manual_seed(config.seed * 1000 + self.rank)  # per process
        self.g_shared = torch.Generator().manual_seed(config.seed)  # identical on every rank
        self.micro_batch = 0  # the micro-batch being worked on, of config.grad_accum
        self.teacher = backbone.load_teacher(teacher_weights).requires_grad_(False).eval()
        self.student = backbone.make_student(self.teacher)
        self.models: dict[str, nn.Module] = {"student": self.student}
        self.data_cost: dict[str, dict[str, float]] = {}  # what build() makes before training
        self.ema = backbone.clone(self.student).requires_grad_(False).eval()
        self.models["ema"] = self.ema
        self.models.update(method.build(self))
        self.sharded_models: set[str] = self._shard() if self.sharded else set()
        self.specs: dict[str, OptimSpec] = method.optim_groups(self)
        for s in self.specs.values():  # a method's copy of the student made all of it trainable
            backbone.mark_trainable(self.models[s.model])
        if not self.sharded:
            backbone.offload(self.teacher)
        # each group's trainable parameters, listed once (after sharding: the optimizer holds
        # the shards; with LoRA only the adapters)
        self._params = {
            g: [
                p
                for m in (s.model, *s.also)
                for p in self.models[m].parameters()
                if p.requires_grad
            ]
            for g, s in self.specs.items()
        }
        self.optims = {g: self._optimizer(self._params[g], s) for g, s in self.specs.items()}
        self.updates = dict.fromkeys(self.specs, 0)  # per-group update counters
        # network calls, teacher NFEs, samples, FLOPs, wall time (run.json "cost"; see
        # cdmbench.compute), hooked after build: a clone of a hooked model would be counted too
        self.compute = ComputeMeter()
        self.compute.install({"teacher": self.teacher, **self.models})
        for what, c in self.data_cost.items():
            self.compute.add_data(what, **c)
        self.it = 0
        self.nan_skipped = 0
        self._log = log

    def _optimizer(self, params: list[Tensor], spec: OptimSpec) -> torch.optim.Optimizer:
        """AdamW over ``params`` with the group's hyper-parameters (``train.optimizer``)."""
        kw = dict(lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
        if self.config.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kw)
        return torch.optim.AdamW(params, **kw)

    def _shard(self) -> set[str]:
        """FSDP2-shard the teacher and every model with parameters; the names sharded.

        Runs after ``method.build`` (methods clone the student there; a sharded model is not
        cloned) and before the optimizers are made, so they hold the shards.
        """
        mesh = sharding.device_mesh(self.device, self.world)
        wrap = tuple(self.backbone.fsdp_wrap_classes)
        sharding.shard_model(self.teacher, wrap, mesh)
        return {name for name, m in self.models.items() if sharding.shard_model(m, wrap, mesh)}

    def full_state_dict(self, name: str) -> dict[str, Tensor]:
        """The whole state dict of ``self.models[name]``, detached on the CPU.

        Under sharding a collective (every rank must call it) whose result is on rank 0
        only; other ranks get an empty dict.
        """
        return cpu_state(sharding.full_model_state(self.models[name]))

    def unsharded(self, name: str) -> nn.Module | None:
        """``self.models[name]`` as a whole model one process can run (sampling, export).

        Unsharded, the model itself. Sharded, a collective: rank 0 gets a fresh copy built
        like the student (the backbone's teacher made trainable, so of the student's
        architecture and dtype) holding the gathered weights, frozen; other ranks get None.
        """
        if name not in self.sharded_models:
            return self.models[name]
        state = self.full_state_dict(name)
        if self.rank != 0:
            return None
        model = self.backbone.make_student(self.backbone.load_teacher(self.teacher_weights))
        model.load_state_dict(state)
        return model.requires_grad_(False).eval()

    # ------------------------------------------------------------------ helpers for methods
    def randn(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.g).to(self.device)

    def rand(self, n: int) -> Tensor:
        return torch.rand(n, generator=self.g).to(self.device)

    def randint(self, high: int, n: int) -> Tensor:
        return torch.randint(0, high, (n,), generator=self.g).to(self.device)

    def next_batch(self) -> Batch:
        n = self.config.batch
        cond = self.backbone.random_cond(n, self.g).to(self.device)
        return Batch(cond, self.randn(n, *self.backbone.latent_shape))

    # ------------------------------------------------------------------------ the loop
    def _lr(self, group: str) -> float:
        spec = self.specs[group]
        k = self.updates[group]
        return spec.lr * min(1.0, (k + 1) / spec.warmup) if spec.warmup > 0 else spec.lr

    def _allreduce_grads(self, params: list[Tensor]) -> None:
        """Average replicated gradients over ranks (FSDP2 has averaged sharded ones already)."""
        if self.world == 1 or (params and sharding.is_dtensor(params[0])):
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world)

    def next_batches(self) -> list[Batch]:
        """The iteration's ``grad_accum`` micro-batches, drawn in order."""
        return [self.next_batch() for _ in range(self.config.grad_accum)]

    def _micro(self, j: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` for micro-batch ``j``, seeing the ``g_shared`` draws micro-batch 0 saw: a
        shared draw (a schedule length) is one per iteration, whatever the accumulation."""
        self.micro_batch = j
        if j == 0:
            self._shared_state = self.g_shared.get_state()
            out = fn(*args)
            self._shared_after = self.g_shared.get_state()
            return out
        self.g_shared.set_state(self._shared_state)
        out = fn(*args)
        self.g_shared.set_state(self._shared_after)
        return out

    def step(self, batch: Batch | Sequence[Batch]) -> dict[str, Tensor]:
        """One iteration: the method's ``prepare``, then every group it schedules, in its order.

        ``batch``: the iteration's micro-batches, or its first one (the core draws the other
        ``grad_accum - 1``). Returns the loss terms (means over the micro-batches) and grad
        norms as detached tensors; converting them to floats is left to the logging cadence.
        One host sync per group remains: the finiteness check that decides whether the
        optimizer may step.
        """
        if isinstance(batch, Batch):
            batches = [batch, *(self.next_batch() for _ in range(self.config.grad_accum - 1))]
        else:
            batches = list(batch)
        self.compute.add_images(sum(len(b) for b in batches))
        with self.compute.counting():
            return self._step(batches)

    def _step(self, batches: list[Batch]) -> dict[str, Tensor]:
        n_micro = len(batches)
        logs: dict[str, Tensor] = {}
        states = [
            self._micro(j, self.method.prepare, self.it, b, self) for j, b in enumerate(batches)
        ]
        for group in self.method.groups_to_update(self.it):
            spec, opt = self.specs[group], self.optims[group]
            opt.zero_grad(set_to_none=True)
            terms: dict[str, Tensor] = {}
            loss: Tensor | float = 0.0
            for j, (b, state) in enumerate(zip(batches, states, strict=True)):
                t = self._micro(j, self.method.losses, group, self.it, b, state, self)
                if n_micro == 1:  # the loss as it is: bit-identical to a run without accumulation
                    terms, loss = t, sum(t.values())
                    loss.backward()
                    continue
                micro_loss = sum(t.values()) / n_micro  # a mean over n_micro x batch samples
                micro_loss.backward()
                loss = loss + micro_loss.detach()
                for name, v in t.items():
                    terms[name] = terms.get(name, 0.0) + v.detach() / n_micro
            params = [p for p in self._params[group] if p.grad is not None]
            self._allreduce_grads(params)
            if spec.clip is not None:
                gnorm = torch.nn.utils.clip_grad_norm_(params, spec.clip)
            else:
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in params])
            gnorm = sharding.full(gnorm)  # a replicated DTensor when the gradients are sharded
            if not bool(torch.isfinite(loss.detach() + gnorm)):
                opt.zero_grad(set_to_none=True)
                self._non_finite(
                    group,
                    {k: float(v.detach()) for k, v in terms.items()} | {"grad_norm": float(gnorm)},
                )
                continue
            for pg in opt.param_groups:
                pg["lr"] = self._lr(group)
            opt.step()
            self.updates[group] += 1
            self.method.after_step(group, self.it, self)
            if spec.model == "student":
                decay = ema_decay(self.updates[group] - 1, self.config.ema_cap)
                ema_update_(self.ema, self.student, decay)
            for k, v in terms.items():
                logs[f"{group}/{k}"] = v.detach()
            logs[f"{group}/grad_norm"] = gnorm.detach()
        self.micro_batch = 0
        self.it += 1
        return logs

    def _non_finite(self, group: str, terms: dict[str, float]) -> None:
        bad = ", ".join(f"{k}={v}" for k, v in terms.items() if not math.isfinite(v)) or str(terms)
        if self.config.on_nan == "skip":
            self.nan_skipped += 1
            return
        raise NonFiniteLossError(
            f"non-finite {group} loss at iteration {self.it} ({bad}); the last good checkpoint is kept "
            f"in {self.run_dir / 'checkpoint'}; rerun with --on-nan skip to skip such steps"
        )

    def train(self, progress: Callable[[int, dict[str, float]], None] | None = None) -> None:
        """Run to ``config.iters``: loss terms to the run's log every ``log_every``
        iterations, a sample grid every ``sample_every`` (see
        :mod:`cdmbench.training.logging`), checkpoints every ``ckpt_every`` and at the end."""
        logger = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            logger = RunLogger(
                self.run_dir, self.config.log_to, self._tracked_config(), resume_it=self.it
            )
        t0 = time.perf_counter()
        self.compute.start_clock()  # wall time in the loop; a checkpoint keeps it
        # the last value of every term, also of groups not updated this step
        latest: dict[str, Tensor] = {}
        while self.it < self.config.iters:
            latest.update(self.step(self.next_batch()))
            if self.it % self.config.log_every == 0 or self.it == self.config.iters:
                # floats (a host sync on GPU) only at the logging cadence; logged before a
                # checkpoint so that a run stopped here and resumed has no gap in its log
                logs = {k: float(v) for k, v in latest.items()}
                if logger is not None:
                    rec = {"it": self.it, "time": round(time.perf_counter() - t0, 3), **logs}
                    logger.record(rec)
                    if self._log is not None:
                        self._log(rec)
                if progress is not None:
                    progress(self.it, logs)
            stop = checkpoint.stop_requested(self.world, self.device)  # a signal on any rank
            if (self.it % self.config.ckpt_every == 0 or stop) and self.it < self.config.iters:
                self.save_checkpoint()
            if stop and self.it < self.config.iters:
                if logger is not None:
                    logger.close()
                raise Preempted(stop, self.it)
            if self.config.sample_every and self.it % self.config.sample_every == 0:
                grid = periodic_samples(self)  # a collective when the EMA is sharded
                if logger is not None and grid is not None:
                    logger.images("samples", grid[0], self.it, nrow=grid[1])
        self.save_checkpoint()
        self.compute.stop_clock()
        if logger is not None:
            logger.close()

    def train_cost(self) -> dict[str, Any]:
        """run.json's ``"cost"``: the run's compute over every session and process (a
        collective under several processes; see :mod:`cdmbench.compute`)."""
        return self.compute.cost(self.it, self.world, self.device)

    def _tracked_config(self) -> dict[str, Any]:
        """The run's settings as a tracker records them."""
        return {
            "method": self.method.name,
            "backbone": self.backbone.name,
            "train": as_dict(self.config),
            "method_config": config_to_dict(self.method.config),
            "backbone_settings": as_dict(self.backbone.settings),
        }

    # ---------------------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors for safetensors, everything else as plain objects for torch.save): the
        single-file checkpoint of one-process runs.

        Whole tensors whether or not the models are sharded. A collective under several
        processes; under sharding only rank 0's result holds the tensors.
        """
        tensors = {
            f"{name}.{k}": v for name in self.models for k, v in self.full_state_dict(name).items()
        }
        other = {
            "it": self.it,
            "updates": self.updates,
            "nan_skipped": self.nan_skipped,
            "optims": {g: sharding.full_optimizer_state(o) for g, o in self.optims.items()},
            "rng": {
                "g": self._rank_states(),
                "g_shared": self.g_shared.get_state(),
                "torch": torch.get_rng_state(),
            },
            "method_state": self.method.state_dict(),
            "method": self.method.name,
            "backbone": self.backbone.name,
            "cost": self.compute.totals(self.world, self.device),
        }
        return tensors, other

    def _rank_states(self) -> list[Tensor]:
        """Every rank's per-process generator state (a collective: all ranks must call it)."""
        if self.world == 1:
            return [self.g.get_state()]
        states: list = [None] * self.world
        dist.all_gather_object(states, self.g.get_state())
        return states

    def save_checkpoint(self) -> Path:
        """Checkpoint everything (a collective under several processes): one process writes
        full tensors to one file, several write their own shards through
        ``torch.distributed.checkpoint``; hashes and a manifest committed last either way.
        See :mod:`cdmbench.training.checkpoint`."""
        return checkpoint.save(self)

    @staticmethod
    def checkpoint_files(ckpt: str | Path) -> dict[str, Path]:
        """The files of a checkpoint's latest save by role ("models"/"state", or "dir"/"state")."""
        return checkpoint.files(ckpt)

    def load_checkpoint(self, ckpt: str | Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote, by any number of processes,
        verifying hashes first (see :mod:`cdmbench.training.checkpoint` for the generators)."""
        checkpoint.load(self, ckpt)


def cpu_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict's tensors detached, contiguous and on the CPU (for safetensors)."""
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
