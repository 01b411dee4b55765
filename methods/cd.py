"""CD: multiphase consistency distillation for flow matching (LCM, arXiv 2310.04378;
PCM, arXiv 2405.18407).

The teacher's probability-flow ODE is cut into phases at fixed points of a 50-point Euler
grid of the (shifted) schedule; within each phase the student learns to jump to the end of
the phase, which makes a k-phase student a k-step sampler. Per step:

    n ~ U{0..49} on the grid s_0 = 1 > s_1 > ... > s_50 = 0,  e = end of n's phase
    x_n = (1 - s_n) x0 + s_n eps                      x0: clean latents (real data if any)
    x_{n+1} = x_n + (s_{n+1} - s_n) v_T^w(x_n)         one Euler step of the teacher, CFG w
    pred    = x_n + (s_e - s_n) v_S(x_n)               student projected to the phase end
    target  = x_{n+1} + (s_e - s_{n+1}) v_tgt(x_{n+1})  (= x_{n+1} when n + 1 = e)
    loss    = mean(sqrt((pred - target)^2 + c^2) - c)   pseudo-Huber, c = 1e-3 (LCM/PCM)

v_tgt is an EMA copy of the student (decay 0.95, LCM) or the online student without grad.
Phase edges for a 4-step student: grid indices 0, 12, 25, 37 (and 50). Clean latents come
from the backbone's real data where it has it (digits), otherwise from a cache of teacher
samples (:class:`~cdmbench.training.teacher_data.TeacherSamples`: x0 on the CPU, conditions
re-encoded per batch, kept on disk beside the run for reuse). Inference: deterministic Euler
jumps between the phase edges. With one phase (``edges=(0,)``) this is LCM: the student maps
any point to x0 and samples at any step count by LCM's multistep loop (predict x0, re-noise
to the next sigma).

Where a phase ends in training (``edge_source``): ``"inference"`` (the default) ends each phase
at the next of the sampler's points, grid indices 12, 25, 37, 50 (sigmas .76, .50, .26, 0
pre-shift), so the student learns exactly the jumps it makes when sampling, as the PCM paper
describes phases. ``"training"`` is what PCM's training code does
(G-U-N/Phased-Consistency-Model, ``EulerSolver.euler_style_multiphase_pred``): it counts the
same phase indices from the clean end of its grid, so phases end at sigmas .74, .50, .24 and
0 (its 0.001, the scheduler's smallest sigma) while its inference scheduler still samples at
1, .76, .50, .26; on the 50-point grid with 4 phases 26 of the 50 grid points (52 %) get a
different phase end. With one phase both are the same.

Defaults: lr 1e-6 (LCM), AdamW betas (0.9, 0.999), weight decay 1e-4, teacher CFG = the
backbone's default (4.5 where none is set), target EMA 0.95, Huber c 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cdmbench import flow
from cdmbench.backbones.base import Cond
from cdmbench.losses import pseudo_huber
from cdmbench.settings import MAX_COUNT, setting
from cdmbench.training.core import ema_update_
from cdmbench.training.method import Batch, Core, Method, OptimSpec, SamplerSpec
from cdmbench.training.teacher_data import TeacherSamples


def _edges_problem(edges: tuple[int, ...]) -> str | None:
    """Phase starts: 0 first, strictly increasing."""
    if edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        return "phase starts must begin at 0 and increase, e.g. 0,12,25,37"
    return None


@dataclass
class CDConfig:
    student_lr: float = setting(1e-6, gt=0)
    weight_decay: float = setting(1e-4, ge=0)
    warmup: int = setting(100, ge=0, le=MAX_COUNT)
    grid: int = setting(50, ge=2, le=10_000)  # Euler grid of the teacher solver
    # phase starts on the grid (4-step student)
    edges: tuple[int, ...] = setting((0, 12, 25, 37), ge=0, check=_edges_problem)
    # None: the backbone's default CFG (4.5 if unset)
    teacher_guidance: float | None = setting(None, ge=0)
    # "ema" (decay target_ema) or "online" (student, no grad)
    target: str = setting("ema", choices=("ema", "online"))
    target_ema: float = setting(0.95, ge=0, le=1)
    huber_c: float = setting(1e-3, gt=0)
    # "real", "teacher" (cached teacher samples) or "auto"
    data: str = setting("auto", choices=("real", "teacher", "auto"))
    # teacher samples cached when data is "teacher"; None: min(10,000, iters x batch x processes)
    cache_size: int | None = setting(None, ge=1, le=MAX_COUNT)
    # where training ends a phase: "inference" (at the sampler's points) or "training" (PCM's
    # training code: the edges counted from the clean end, e.g. .74, .50, .24, 0)
    edge_source: str = setting("inference", choices=("inference", "training"))


def phase_ends(edges: tuple[int, ...], grid: int, source: str = "inference") -> list[int]:
    """The grid indices where phases end in training, ascending (the last is ``grid``).

    ``"inference"``: the next phase start (``edges[1:]``, then ``grid``). ``"training"``:
    PCM's training rule: its Euler grid runs from the clean end (index j goes from sigma
    (j + 1) / grid to j / grid) and index j ends at the largest phase index i <= j, at sigma
    i / grid; on this grid (s_n = 1 - n / grid, counted from the noise end) that is the smallest of
    ``grid - i`` above n.
    """
    if source == "training":
        return sorted({grid - e for e in edges if e < grid})
    return [*edges[1:], grid]


def phase_end(n: Tensor, edges: tuple[int, ...], grid: int, source: str = "inference") -> Tensor:
    """Index of the end of the phase that grid index ``n`` lies in (see :func:`phase_ends`)."""
    ends = torch.tensor(phase_ends(edges, grid, source), device=n.device)
    return ends[torch.searchsorted(ends, n, right=True)]


class CD(Method[None]):
    """Multiphase consistency distillation for flow matching (LCM/PCM style)."""

    name = "cd"
    Config = CDConfig
    aux_models = {"target": False}  # the EMA target (target="ema")
    grad_forwards = {"student": 1}
    backbone_defaults = {
        # digits, tuned: the paper variant (PCM's training edges, online target, weight decay
        # 1e-3) with the best trial of the committed sweep (results/sweeps.jsonl: K = 16, seed
        # 0, 300 iterations, val split; trial 5): one phase (LCM), so one student serves every
        # step count
        "digits": {
            "student_lr": 2.1e-05,
            "edges": (0,),
            "huber_c": 0.0013,
            "target": "online",
            "edge_source": "training",
            "weight_decay": 1e-3,
            "train": {"iters": 1500, "batch": 128},
        },
    }
    # `cdmbench sweep` (digits tuned = its best trial); paper: 1e-6 / online / 1e-3 / 4 phases
    search_space = {
        "student_lr": ("log", 1e-6, 1e-3),
        "target": ("choice", ["online", "ema"]),
        "huber_c": ("log", 1e-4, 1e-1),
        "edges": ("choice", [(0,), (0, 12, 25, 37)]),
    }
    paper_defaults = {
        # digits: PCM's 4 phases as its training scripts run them (the phase edges of its
        # training code, the online student as target, weight decay 1e-3 of its launch
        # scripts); the teacher's CFG is the backbone's (where its samples are best, as PCM
        # picks its w for SD); lr: the digits base 1e-4 (PCM's 5e-6 trains a LoRA of an SD
        # network and would barely move the digits UNet in 1500 iterations).
        "digits": {
            "student_lr": 1e-4,
            "edge_source": "training",
            "target": "online",
            "weight_decay": 1e-3,
        },
    }

    def build(self, core: Core) -> dict[str, nn.Module]:
        c, bb = self.config, core.backbone
        self.grid = torch.tensor(
            flow.uniform_schedule(c.grid, bb.shift), dtype=torch.float32, device=core.device
        )
        w = c.teacher_guidance
        self.w = w if w is not None else (bb.default_teacher_guidance or 4.5)
        real = bb.real_latents("train") if c.data in ("auto", "real") else None
        self.data: tuple[Tensor, Cond] | None = None  # real (x0, conditions), on the device
        self.samples: TeacherSamples | None = None  # otherwise teacher samples
        if real is None:
            if c.data == "real":
                raise ValueError(f"backbone '{bb.name}' has no real data; use data='teacher'")
            self.samples = TeacherSamples.for_trainer(core, core.config.batch, c.cache_size)
        else:
            x0, labels = real
            self.data = (x0.to(core.device), bb.encode_labels(labels))
        models = {}
        if c.target == "ema":
            models["target"] = bb.clone(core.student).requires_grad_(False).eval()
        return models

    def optim_groups(self, core: Core) -> dict[str, OptimSpec]:
        c = self.config
        return {
            "student": OptimSpec(
                "student", lr=c.student_lr, weight_decay=c.weight_decay, warmup=c.warmup
            )
        }

    def groups_to_update(self, it: int) -> list[str]:
        return ["student"]

    def sampler(self, steps: int, shift: float) -> SamplerSpec:
        """Phase edges when ``steps`` equals the phase count; a one-phase (LCM) student uses
        LCM's multistep sampler at any other count (predict x0, re-noise); otherwise Euler."""
        c = self.config
        if steps == len(c.edges):
            grid = flow.uniform_schedule(c.grid, shift)
            return SamplerSpec([grid[i] for i in c.edges] + [0.0])
        return SamplerSpec(flow.uniform_schedule(steps, shift), stochastic=len(c.edges) == 1)

    def _clean(self, b: int, core: Core) -> tuple[Tensor, Cond]:
        """``b`` clean latents and their conditions, drawn uniformly with replacement."""
        if self.samples is not None:
            pick = self.samples.draw(b, core.g)
            return self.samples.targets(pick), self.samples.cond(pick)
        x_all, cond_all = self.data
        pick = core.randint(len(x_all), b)
        return x_all[pick], cond_all.select(pick)

    def losses(
        self, group: str, it: int, batch: Batch, state: None, core: Core
    ) -> dict[str, Tensor]:
        c, bb = self.config, core.backbone
        b = len(batch)
        x0, cond = self._clean(b, core)
        n = core.randint(c.grid, b)
        e = phase_end(n, c.edges, c.grid, c.edge_source)
        s_n, s_n1, s_e = self.grid[n], self.grid[n + 1], self.grid[e]
        x_n = flow.add_noise(x0, batch.noise, s_n)
        with torch.no_grad():
            x_n1 = flow.euler_step(
                x_n, s_n, s_n1, bb.velocity(core.teacher, x_n, s_n, cond, self.w)
            )
            tgt_model = core.models["target"] if c.target == "ema" else core.student
            v_t = bb.velocity(tgt_model, x_n1, s_n1, cond)
            last = flow.append_dims(n + 1 == e, x0.ndim)  # the teacher's step ends the phase
            target = torch.where(last, x_n1, flow.euler_step(x_n1, s_n1, s_e, v_t))
        pred = flow.euler_step(x_n, s_n, s_e, bb.velocity(core.student, x_n, s_n, cond))
        return {"huber": pseudo_huber(pred, target, c.huber_c)}

    def after_step(self, group: str, it: int, core: Core) -> None:
        if self.config.target == "ema":
            ema_update_(core.models["target"], core.student, self.config.target_ema)
