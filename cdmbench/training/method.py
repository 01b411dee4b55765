"""The method interface: what a distillation method tells the training core, and what it may
use of it.

A method is a subclass of :class:`Method` in a module of its own (``methods/cdm.py``),
registered under a name: the built-in ones in :data:`cdmbench.registry.METHODS`, a
third-party one through the ``cdmbench.methods`` entry-point group of its package. The
training core (:class:`cdmbench.training.core.Trainer`) owns the frozen teacher, the student
and its EMA, one optimizer per group, checkpoints, numerical guards and the loop. The method
says:

    build(core) -> {name: module}             auxiliary models (fake score, target), once
    optim_groups(core) -> {group: OptimSpec}  one optimizer per group: model, lr, warm-up, clip
    groups_to_update(it) -> [group, ...]      the groups that step at iteration ``it``, in order
    prepare(it, batch, core) -> state         per-iteration work the groups share (default None)
    losses(group, it, batch, state, core)     -> {term: scalar}; the core sums and backpropagates
    after_step(group, it, core)               after a group's optimizer step (merges, targets)
    sampler(steps, shift) -> SamplerSpec      how the student samples at ``steps`` steps

One iteration of the core:

    batch = Batch(cond, noise)                    random conditions, their noise
    state = method.prepare(it, batch, core)
    for group in method.groups_to_update(it):
        loss = sum(method.losses(group, it, batch, state, core).values())
        backward, average over processes, clip, step the group's optimizer
        method.after_step(group, it, core)
        a step of a group that trains "student" also updates the student's EMA

With ``train.grad_accum = k`` an iteration has k micro-batches: ``prepare`` runs on each of
them first (one state per micro-batch), then each group backpropagates its losses on every
micro-batch, scaled by 1/k, before its one step; ``core.micro_batch`` says which micro-batch
a hook is working on.

``state`` is a value of the method's own type (a dataclass: ``Method[MyState]``), made once
per iteration by :meth:`Method.prepare`, e.g. a backward simulation every group trains on.
A group that needs something another group computes (DMD's fake score trains on the
student's sample) finds it in the state or computes it there itself, so no group depends on
the order of the others.

``core`` is a :class:`Core`: everything a method may use of the trainer. All randomness
comes from its generators, which the core checkpoints: ``randn``/``rand``/``randint`` (and
``g``) differ per process; ``g_shared`` is identical on every process, for choices that all
processes must agree on (a schedule length, a step count).

A method's options are ``Config``, a dataclass whose defaults are the paper's, in
``self.config``; ``backbone_defaults`` scales them per backbone (and the core's
:class:`~cdmbench.training.core.TrainConfig` under the key ``"train"``). Losses shared by
methods are in :mod:`cdmbench.losses`, the flow-matching conventions, schedules and samplers
in :mod:`cdmbench.flow`. State that must survive a resume other than models and RNGs goes
through :meth:`Method.state_dict` / :meth:`Method.load_state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn

from cdmbench import flow
from cdmbench.backbones.base import Backbone, Cond
from cdmbench.generate import SamplerSpec

if TYPE_CHECKING:
    from cdmbench.training.core import TrainConfig

__all__ = ["VARIANTS", "Batch", "Core", "Method", "OptimSpec", "SamplerSpec", "config_to_dict"]

# Each method runs as its authors run it ("paper": their hyperparameters, transferred to the
# backbone) and, where a backbone has one, as tuned for it ("tuned": e.g. the digits defaults,
# from the committed sweep); reports label every row with its variant.
VARIANTS = ("paper", "tuned")


@dataclass
class Batch:
    """What one iteration works on: random conditions and their initial noise."""

    cond: Cond
    noise: Tensor

    def __len__(self) -> int:
        return self.noise.shape[0]


@dataclass
class OptimSpec:
    """One optimizer group: which model it trains and how (AdamW)."""

    model: str  # name of the model in core.models
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    clip: float | None = 1.0  # max grad norm; None disables
    warmup: int = 100  # linear warm-up, in updates of this group
    # further models in core.models whose parameters this optimizer also trains, clipped
    # together with ``model``'s (a head on the model's features, e.g. DMD2's classifier)
    also: tuple[str, ...] = ()


@runtime_checkable
class Core(Protocol):
    """What a method may use of the training core."""

    backbone: Backbone
    teacher: nn.Module  # frozen
    student: nn.Module
    ema: nn.Module  # the student's EMA, updated by the core
    models: dict[str, nn.Module]  # "student", "ema" and what Method.build returned
    config: TrainConfig  # the core's settings (seed, batch, device)
    device: torch.device
    run_dir: Path  # the run's directory; its parent holds caches shared by runs
    rank: int  # this process, of ``world``
    world: int
    g: torch.Generator  # per process
    g_shared: torch.Generator  # identical on every process
    micro_batch: int  # which of the iteration's config.grad_accum micro-batches is worked on
    # the cost of data made before training, by what: {samples, teacher_nfe, flops} (see
    # cdmbench.compute; TeacherSamples.for_trainer fills it)
    data_cost: dict[str, dict[str, float]]

    def randn(self, *shape: int) -> Tensor:
        """Standard normals of ``shape`` from ``g``, on the device."""
        ...

    def rand(self, n: int) -> Tensor:
        """``n`` uniforms in [0, 1) from ``g``, on the device."""
        ...

    def randint(self, high: int, n: int) -> Tensor:
        """``n`` integers in [0, high) from ``g``, on the device."""
        ...


StateT = TypeVar("StateT")


class Method(Generic[StateT]):
    """Base class of distillation methods; ``StateT`` is what :meth:`prepare` returns.

    Subclasses set ``name``, ``Config`` (a dataclass of the method's options with the
    reference defaults) and ``backbone_defaults`` (per-backbone overrides of those options,
    and of the core's ``TrainConfig`` under the key ``"train"``).
    """

    name: ClassVar[str] = "method"
    Config: ClassVar[type] = object
    backbone_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # What `cdmbench plan` sizes a run by (:mod:`cdmbench.plan`): the models :meth:`build`
    # adds, each trained or frozen, and how many forwards with gradients one update of each
    # group holds until its backward (one per network call whose graph the loss keeps).
    aux_models: ClassVar[dict[str, bool]] = {}  # name -> trained
    # The authors' hyperparameters transferred to a backbone (see :meth:`variant_overrides`).
    paper_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # What `cdmbench sweep` searches (:mod:`cdmbench.sweep`): a few ``Config`` settings that
    # matter, each a range that holds the paper's value and the tuned one: ("log", lo, hi)
    # (log-uniform), ("uniform", lo, hi), ("int", lo, hi) (inclusive) or ("choice", [values]).
    search_space: ClassVar[dict[str, tuple]] = {}
    grad_forwards: ClassVar[dict[str, int]] = {"student": 1}

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def variant_overrides(cls, backbone: str, variant: str = "tuned") -> dict[str, Any]:
        """The overrides of ``Config`` (and of the core's settings under ``"train"``) that make
        ``variant`` on ``backbone`` (see :data:`VARIANTS`).

        ``paper``: the authors' hyperparameters; ``paper_defaults[backbone]`` transfers them
        to the backbone (what must change with the network: e.g. a learning rate that the
        paper's scale would leave untrained), and the training budget (``"train"``) is the
        tuned variant's unless it names its own, so both variants get the same compute.
        ``tuned``: ``backbone_defaults[backbone]``; a backbone without an entry there has no
        tuned variant and gets the paper's.
        """
        if variant not in VARIANTS:
            from cdmbench.errors import UserError

            raise UserError(f"unknown variant '{variant}': use {' or '.join(VARIANTS)}")
        if variant == "tuned" and backbone in cls.backbone_defaults:
            return dict(cls.backbone_defaults[backbone])
        paper = dict(cls.paper_defaults.get(backbone, {}))
        if "train" not in paper and backbone in cls.backbone_defaults:
            paper["train"] = cls.backbone_defaults[backbone].get("train", {})
        return paper

    @classmethod
    def default_config(cls, backbone: str, variant: str = "tuned") -> Any:
        """The method's config of ``variant`` on ``backbone``."""
        over = {k: v for k, v in cls.variant_overrides(backbone, variant).items() if k != "train"}
        return replace(cls.Config(), **over)

    @classmethod
    def default_train(cls, backbone: str, variant: str = "tuned") -> dict[str, Any]:
        """The variant's overrides of the core's ``TrainConfig`` on ``backbone``."""
        return dict(cls.variant_overrides(backbone, variant).get("train", {}))

    @classmethod
    def variant_of(cls, backbone: str, config: Any) -> str:
        """The label of a resolved method config: "tuned" or "paper" when it is that
        variant's (a backbone without a tuned variant has only "paper"); otherwise the
        nearer of the two with the settings that differ, e.g. "tuned (gan_weight=0.005)",
        or "tuned + 5 changes" past three. The training budget does not enter the label (a
        report shows it as compute)."""
        have = config_to_dict(config)
        best: tuple[int, str, list[str]] | None = None
        for v in ("tuned", "paper") if backbone in cls.backbone_defaults else ("paper",):
            base = config_to_dict(cls.default_config(backbone, v))
            diff = [f"{k}={_short(have[k])}" for k in base if have.get(k) != base[k]]
            if best is None or len(diff) < best[0]:
                best = (len(diff), v, diff)
        n, v, diff = best
        if n == 0:
            return v
        return f"{v} ({', '.join(diff)})" if n <= 3 else f"{v} + {n} changes"

    # -- what the core calls
    def build(self, core: Core) -> dict[str, nn.Module]:
        """Auxiliary models (fake score, targets); the student and its EMA exist already."""
        return {}

    def optim_groups(self, core: Core) -> dict[str, OptimSpec]:
        """One optimizer per group, by group name."""
        raise NotImplementedError

    def groups_to_update(self, it: int) -> list[str]:
        """The groups that step at iteration ``it``, in order (default: ``"student"``)."""
        return ["student"]

    def prepare(self, it: int, batch: Batch, core: Core) -> StateT | None:
        """Work shared by this iteration's groups, done once before them (default: none)."""
        return None

    def losses(
        self, group: str, it: int, batch: Batch, state: StateT, core: Core
    ) -> dict[str, Tensor]:
        """The group's loss terms (scalars); the core backpropagates their sum."""
        raise NotImplementedError

    def after_step(self, group: str, it: int, core: Core) -> None:
        """Called after the group's optimizer step."""

    def sampler(self, steps: int, shift: float) -> SamplerSpec:
        """The schedule this method's student uses at ``steps`` (default: uniform Euler)."""
        return SamplerSpec(flow.uniform_schedule(steps, shift))

    def state_dict(self) -> dict[str, Any]:
        """What of the method, beyond models and generators, a checkpoint keeps (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def _short(v: Any) -> str:
    """A setting's value as a label shows it: numbers in %g, sequences comma-joined."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return ",".join(_short(x) for x in v)
    return str(v)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a dict of its fields ({} for anything else)."""
    if not is_dataclass(cfg):
        return {}
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
