"""The backbone contract: one family of models behind a small interface.

Methods, samplers and metrics only talk to a model through a :class:`Backbone`, so every
method and metric works unchanged on `digits`, `sd3` and `longcat`. A backbone owns its
settings (a typed ``Settings`` dataclass, reachable from TOML ``[backbone]`` and
``--set backbone.KEY=VALUE``) and its evaluation defaults; nothing outside the backbone
branches on its name.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cdmbench import compute, flow
from cdmbench.errors import UserError
from cdmbench.prompts_io import Prompt
from cdmbench.settings import MAX_COUNT, MAX_STEPS, apply, as_dict, setting


@dataclass
class Cond:
    """Batched conditioning: a dict of batch-first tensors, plus one unconditional row."""

    tensors: dict[str, Tensor]
    null: dict[str, Tensor]  # each with a leading batch dim of 1
    # [uncond; cond], built on first use: a sampler's CFG calls reuse it at every step
    _with_uncond: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, idx: Tensor | slice) -> Cond:
        return Cond({k: v[idx] for k, v in self.tensors.items()}, self.null)

    def uncond(self, n: int | None = None) -> dict[str, Tensor]:
        n = len(self) if n is None else n
        return {k: v.expand(n, *v.shape[1:]) for k, v in self.null.items()}

    def with_uncond(self) -> dict[str, Tensor]:
        """[uncond; cond] stacked on the batch dim, for one CFG network call (built once)."""
        if self._with_uncond is None:
            u = self.uncond()
            self._with_uncond = {k: torch.cat([u[k], v]) for k, v in self.tensors.items()}
        return self._with_uncond

    def to(self, device) -> Cond:
        return Cond(
            {k: v.to(device) for k, v in self.tensors.items()},
            {k: v.to(device) for k, v in self.null.items()},
        )


MAX_EVAL_BATCH = 1 << 16  # images per generation call; more is a typo, not a batch


def _fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 module (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(model, FSDPModule)


class _ZeroGradThrough(torch.autograd.Function):
    """``x`` unchanged; ``through`` gets a zero gradient, so that the backward also runs
    through the graph that made it (its hooks fire; its parameters get exact zeros)."""

    @staticmethod
    def forward(ctx, x: Tensor, through: Tensor) -> Tensor:
        ctx.like = (through.shape, through.dtype, through.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        shape, dtype, device = ctx.like
        return grad, torch.zeros(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class BackboneSettings:
    """What every backbone declares: its teacher's reference sampler and how `cdmbench eval`
    and `bench` run on it. A backbone's ``Settings`` subclasses this, changing defaults and
    adding its own fields; ``hashed=False`` marks those that do not change a run's result."""

    # steps of the teacher's reference Euler sampler
    teacher_steps: int = setting(50, ge=1, le=MAX_STEPS)
    teacher_guidance: float = setting(1.0, ge=0)  # its CFG scale
    # images per generation call in eval
    eval_batch: int = setting(8, hashed=False, ge=1, le=MAX_EVAL_BATCH)
    # samples per prompt, full evaluation
    eval_samples: int = setting(1, hashed=False, ge=1, le=MAX_COUNT)
    # samples per prompt, `bench --quick`
    eval_samples_quick: int = setting(1, hashed=False, ge=1, le=MAX_COUNT)
    eval_metrics: tuple[str, ...] = setting(  # what eval scores without --metrics
        ("fid", "clip_score", "precision_recall", "latency"), hashed=False
    )
    eval_prompts: str = setting("default", hashed=False)  # prompt set or file of eval
    fid_reference: str = setting("", hashed=False)  # FID reference folder; "": the real data

    def __post_init__(self) -> None:
        for name in ("teacher_steps", "eval_batch", "eval_samples", "eval_samples_quick"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(
                    f"backbone.{name} must be a whole number >= 1, got {getattr(self, name)!r}"
                )


class Backbone:
    """Base class. A subclass sets ``name`` and ``latent_shape`` (``shift`` where its
    schedules are shifted), declares its ``Settings`` (a frozen dataclass subclassing
    :class:`BackboneSettings`) and implements ``load_teacher``, ``prompts``, ``encode``,
    ``forward`` and ``decode``; everything else has a working default.

    Construction: ``Backbone(device, settings)`` with ``settings`` a ``Settings`` instance
    or a mapping of its fields (values as text are coerced), and/or keyword settings.
    """

    name: str = "backbone"
    Settings: ClassVar[type[BackboneSettings]] = BackboneSettings
    latent_shape: tuple[int, ...] = ()
    shift: float = 1.0  # SD3 time shift applied to every schedule
    dtype: torch.dtype = torch.float32
    fsdp_wrap_classes: tuple[type, ...] = ()
    # convolutional parts (the VAE) in channels-last memory format; None: on CUDA only, where
    # cuDNN's NHWC kernels are the fast ones
    channels_last: bool | None = None
    trains_teacher: ClassVar[bool] = False  # `cdmbench teacher` can build its weights

    def __init__(
        self,
        device: str = "cpu",
        settings: BackboneSettings | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.device = str(device)
        self.settings = self.make_settings(settings, **kwargs)

    @classmethod
    def make_settings(
        cls, settings: BackboneSettings | Mapping[str, Any] | None = None, **kwargs: Any
    ) -> BackboneSettings:
        """``Settings`` from an instance, a mapping and/or keywords (later ones win)."""
        if isinstance(settings, cls.Settings):
            base, given = settings, {}
        else:  # a mapping, another backbone's Settings (its shared fields), or None
            base = cls.Settings()
            given = as_dict(settings) if is_dataclass(settings) else dict(settings or {})
        updates = {**given, **kwargs}
        return apply(base, {k: _plain(v) for k, v in updates.items()}, "backbone")

    @property
    def default_teacher_steps(self) -> int:
        return self.settings.teacher_steps

    @property
    def default_teacher_guidance(self) -> float:
        return self.settings.teacher_guidance

    def run_settings(self) -> dict[str, Any]:
        """The settings that change what a run computes, as JSON values (part of its hash;
        ``load_run`` rebuilds the backbone from them)."""
        return as_dict(self.settings, hashed_only=True)

    def teacher_id(self, weights: str | None = None) -> str:
        """Identity of the weights ``load_teacher(weights)`` loads, for a run's hash: a
        file's content hash, a folder's fingerprint (:func:`weights_fingerprint`)."""
        return f"{self.name}-default" if weights is None else weights_fingerprint(weights)

    def use_channels_last(self) -> bool:
        return (
            str(self.device).startswith("cuda")
            if self.channels_last is None
            else self.channels_last
        )

    def train_teacher_assets(
        self,
        out_dir: str | Path,
        *,
        seed: int = 0,
        iters: int | None = None,
        epochs: int | None = None,
        progress=None,
    ) -> str:
        """Train this backbone's own teacher (and whatever its metrics need) into
        ``out_dir``; returns a one-line summary. Only where ``trains_teacher``."""
        raise UserError(
            f"backbone '{self.name}' loads a pretrained teacher; it has no teacher "
            "training of its own"
        )

    # ---- models
    def load_teacher(self, weights: str | None = None) -> nn.Module:
        raise NotImplementedError

    def make_student(self, teacher: nn.Module) -> nn.Module:
        """A trainable copy of the teacher (students are initialised from the teacher)."""
        student = self.clone(teacher)
        student.requires_grad_(True).train()
        return student

    def clone(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model)

    def mark_trainable(self, model: nn.Module) -> None:
        """Restrict a trained model (student, fake score) to the parameters training may change
        (default: all of them, as the method made them)."""

    def offload(self, model: nn.Module) -> None:
        """Keep a frozen model's weights off the accelerator between its calls (default: no)."""

    def plain_state(self, model: nn.Module) -> dict[str, Tensor]:
        """A trained model's weights as a state dict of :meth:`load_teacher`'s architecture
        (adapters merged in where the backbone trains any)."""
        return model.state_dict()

    def adapter_state(self, model: nn.Module) -> dict[str, Tensor] | None:
        """A trained model's LoRA adapter weights, or None where it has none."""
        return None

    # ---- conditioning
    def prompts(self, split: str = "train") -> Sequence[Prompt]:
        """The training prompts (``"train"``: any sequence, e.g. a file read on demand) or
        the evaluation ones (``"test"``)."""
        raise NotImplementedError

    def warn_prompt_overlap(self, prompts: Sequence[Prompt] | None = None) -> int:
        """Warn when evaluation ``prompts`` (default: the backbone's) are among the training
        prompts; how many are.
        Nothing here: a class-conditional backbone trains and evaluates on every class."""
        return 0

    def encode(self, prompts: Sequence[Prompt]) -> Cond:
        raise NotImplementedError

    def prepare_embeddings(self, cache_dir: str | Path, extra: Sequence[Prompt] = ()) -> None:
        """Before training (every process calls it): build or open whatever caches the
        conditioning of the training prompts and of ``extra`` (prompts sampled on during
        training), in ``cache_dir`` unless a setting names another folder. Nothing here."""

    def random_cond(self, n: int, generator: torch.Generator) -> Cond:
        """``n`` training prompts drawn uniformly with replacement, encoded (the trainer's
        conditioning for each batch). Only the drawn prompts are read: ``prompts("train")``
        may be a file of any size served on demand."""
        prompts = self.prompts("train")
        idx = torch.randint(0, len(prompts), (n,), generator=generator).tolist()
        return self.encode([prompts[i] for i in idx])

    # ---- the network as a velocity field
    def forward(self, model: nn.Module, x: Tensor, s: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One raw network call: v(x, s | cond); ``s`` is a [B] tensor of sigmas."""
        raise NotImplementedError

    def velocity(
        self, model: nn.Module, x: Tensor, s: Tensor, cond: Cond, guidance: float = 1.0
    ) -> Tensor:
        """v at (x, s), with classifier-free guidance batched in one call when w != 1."""
        s = _sigma_rows(s, x)
        if guidance == 1.0:
            return self.forward(model, x, s, cond.tensors).float()
        return flow.cfg(*self.velocity_uc(model, x, s, cond), guidance)

    def velocity_uc(
        self, model: nn.Module, x: Tensor, s: Tensor, cond: Cond
    ) -> tuple[Tensor, Tensor]:
        """(v_uncond, v_cond) from one batched call, for methods that need both."""
        s = _sigma_rows(s, x)
        v = self.forward(model, torch.cat([x, x]), torch.cat([s, s]), cond.with_uncond()).float()
        v_u, v_c = v.chunk(2)
        return v_u, v_c

    def x0(
        self, model: nn.Module, x: Tensor, s: Tensor, cond: Cond, guidance: float = 1.0
    ) -> Tensor:
        """The model's clean-sample prediction x0 = x - s v (float32)."""
        return flow.x0_from_v(x, s, self.velocity(model, x, s, cond, guidance))

    # ---- intermediate features (DMD2's GAN head reads the fake score's)
    def feature_width(self, model: nn.Module) -> int:
        """The width C of :meth:`features` for ``model``."""
        raise UserError(f"backbone '{self.name}' has no feature hook for the GAN head")

    def features(self, model: nn.Module, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        """The network's middle features at (x, s | cond) as float32 [B, C] (C =
        :meth:`feature_width`): what a classifier on the model's own representation reads
        (DMD2 Sec. 4.3 uses the UNet's bottleneck). Differentiable in ``x`` and the model."""
        raise UserError(f"backbone '{self.name}' has no feature hook for the GAN head")

    def _hooked(
        self,
        block: nn.Module,
        model: nn.Module,
        x: Tensor,
        s: Tensor,
        cond: Cond,
        pick: Callable[[Any], Tensor] = lambda out: out,
    ) -> Tensor:
        """``pick`` of the output of ``block`` during one :meth:`forward` of ``model`` (a
        forward hook; the call runs to its end, so wrappers that gather or shard around it
        stay balanced). A backward from it runs through the layers before the block only,
        and the training run's compute accounting counts it so."""
        seen: list[Any] = []
        handle = block.register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            with compute.reading(model, block) as count_backward:
                final = self.forward(model, x, _sigma_rows(s, x), cond.tensors)
        finally:
            handle.remove()
        out = pick(seen[0])
        if _fsdp2(model):
            # FSDP2 gathers the root's own weights (embeddings, norms) for the backward only
            # when the gradient enters through the root's output: tie that output in with a
            # zero gradient, so the backward runs through the whole network (counted as a
            # full backward), exactly as before in value
            return _ZeroGradThrough.apply(out, final)
        count_backward(out)
        return out

    # ---- pixels
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images as float in [0, 1], shape [B, C, H, W]."""
        raise NotImplementedError

    def real_latents(self, split: str = "train") -> tuple[Tensor, Tensor] | None:
        """(latents, prompt index) of real data, where the backbone has it; else None."""
        return None

    def real_images(self, split: str = "test") -> Tensor | None:
        """Real images as float in [0, 1], [N, C, H, W], where the backbone has real data; else None."""
        return None

    def domain_classifier(self) -> nn.Module | None:
        """A classifier of this backbone's images (``features(x)`` and ``head(features)`` on
        inputs in [-1, 1]) whose features define domain metrics (Fréchet distance, prompt
        accuracy); None where the backbone has none."""
        return None

    def export(
        self, student: nn.Module, out_dir, sigmas: list[float], stochastic: bool = False
    ) -> Path:
        """Write the student in its family's native format (diffusers layout where there is one)."""
        raise UserError(
            f"backbone '{self.name}' has no native export format; its student is the run's "
            "student.safetensors"
        )

    def export_adapter(self, adapter: dict[str, Tensor], out_dir) -> Path:
        """Write LoRA weights (:meth:`adapter_state`) where the family's loader reads them."""
        raise UserError(f"backbone '{self.name}' has no LoRA export")

    def schedule(self, steps: int) -> list[float]:
        """The default uniform schedule at this backbone's shift."""
        return flow.uniform_schedule(steps, self.shift)

    def generation_settings(self) -> dict:
        """Settings besides the teacher's weights that change what the teacher generates from
        given noise and prompt (text encoders, sequence length, guidance variant), as plain
        JSON values: content-keyed caches of teacher samples hash them. Subclasses extend it."""
        return {"name": self.name, "latent_shape": list(self.latent_shape), "shift": self.shift}


def weights_fingerprint(spec: str | os.PathLike) -> str:
    """Identity of weights named by ``spec``: ``sha256:`` + 16 hex digits of a file's content;
    for a folder ``folder:`` + 16 hex digits of sha256 over the sorted (relative path, size,
    mtime_ns) of every file under it (links followed, as loaders follow them); else the spec.

    A folder is fingerprinted by its listing, not its bytes: reading tens of GB per run would
    cost minutes, while any rewrite of a file changes its size or mtime. The error this
    allows is a copy without preserved mtimes hashing anew, which costs a retrain, never a
    wrong reuse.
    """
    from cdmbench.io import sha256_file

    path = Path(spec).expanduser()
    if path.is_file():
        return "sha256:" + sha256_file(path)[:16]
    if path.is_dir():
        rows = []
        for root, _, files in os.walk(path, followlinks=True):
            for f in files:
                p = Path(root) / f
                st = p.stat()
                rows.append(f"{p.relative_to(path).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}")
        return "folder:" + hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()[:16]
    return os.fspath(spec)


def _plain(value: Any) -> Any:
    """A Python-side setting value as its plain form: dtypes by name, paths as text."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _sigma_rows(s: Tensor | float, x: Tensor) -> Tensor:
    """``s`` as a float32 [B] tensor on x's device (a sampler's rows pass through untouched)."""
    if (
        isinstance(s, Tensor)
        and s.dtype == torch.float32
        and s.shape == x.shape[:1]
        and s.device == x.device
    ):
        return s
    return torch.as_tensor(s, dtype=torch.float32, device=x.device).expand(x.shape[0])
