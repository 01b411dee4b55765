"""`cdmbench plan`: what each GPU holds when a configuration trains, before a GPU is rented.

The models are built on the meta device (no memory, no weights) from their configurations:
the backbone's shipped component configs (``backbones/assets/plan_<backbone>.json``; a tiny
twin's own builders), so parameter and buffer counts are those of the real classes. Per rank,
in bytes:

- weights: teacher (``dtype``: bf16 on GPU), student, its EMA and the method's auxiliary models
  (:attr:`Method.aux_models`; float32 ``train_dtype`` masters), each divided by N under FSDP2
  (``train.shard`` fsdp2, or auto with N > 1: the documented launch passes ``--use_fsdp
  --fsdp_version 2``); the text encoders and the VAE in ``dtype``, replicated. With
  ``backbone.offload_frozen`` the teacher, text encoders and VAE stay in CPU memory and only
  the block being run is on the GPU.
- buffers: every model's, replicated (FSDP2 shards parameters only).
- gradients: float32, one per trained parameter, sharded like the weights (each group's
  gradients stay allocated between its updates).
- optimizer: AdamW's two float32 moments per trained parameter; ``train.optimizer=adamw8bit``:
  two bytes (bitsandbytes' block-wise 8-bit states). Sharded like the weights.
- gathered: FSDP2's all-gathered blocks in flight, two of the largest (the running one and
  the prefetched one), in the model's dtype.
- activations: the largest group update: :attr:`Method.grad_forwards` forwards with gradients,
  each ``micro-batch x (per-token bytes x tokens)`` from the measured figures below, plus the
  low-precision weight copies autocast keeps for their backward (all blocks' without
  checkpointing, one block's with it), plus the working set of the widest forward without
  gradients or of a block's backward (two blocks' activations at the micro-batch).

- latents, conditions: what a step keeps besides the networks' activations, per sample:
  :data:`LATENT_COPIES` float32 latents (the noise, a method's state between forwards: CDM's
  anchor x_t, v and x0 from the backward simulation; each loss's re-noised input and target)
  and the text conditioning twice (the batch's, and its CFG-batched copy). CDM's whole
  backward-simulated trajectory (x_t, v, x0 at up to ``n_max`` steps) lives only during the
  no-grad simulation, before the update's activations exist, and is smaller than them.
- with ``backbone.embed_cache = "disk"`` the text encoders leave the GPU after the
  embeddings are cached (``cdmbench.embed_cache``): they are not counted.

On a GPU (``device="cuda"``, what ``cdmbench plan`` plans for) memory outside PyTorch's
tensors adds, per rank (:class:`Overheads`, each overridable on the command line):

- CUDA context: the driver context, loaded kernel images and the cuBLAS/cuDNN handles and
  workspaces, ~0.5-1 GB per process with PyTorch on H100-class GPUs (PyTorch's "CUDA
  semantics" notes: memory the caching allocator does not track); 0.8 GB by default.
- NCCL buffers (several processes): ``NCCL_BUFFSIZE`` (4 MiB) for the Simple protocol plus
  the LL128 and LL buffers, per channel and peer, for up to 32 channels on NVLink (NCCL's
  environment-variable documentation): ~0.6 GB by default.
- allocator slack: PyTorch's caching allocator keeps freed blocks reserved and rounds and
  splits segments, so reserved memory exceeds the peak of allocated tensors; counted as a
  fraction (default 10 %) of what is allocated and freed every step (activations, gathered
  blocks, latents and conditions).

``benchmarks/plan_accuracy.py`` plans for the CPU, where none of these exist.

Tokens: image tokens (``resolution / 16`` per side: VAE 8 x patch 2, or 2 x 2 packing) plus the
backbone's text tokens (SD3: 77 CLIP + ``max_sequence_length`` T5; LongCat: 512).

Activation figures (``backbones/assets/activation_figures.json``) are bytes saved for the
backward per token, for a model with one block of each kind ("base") and per further block
("per_block"), for image and text tokens, in float32 and under bf16 autocast, with and
without gradient checkpointing. ``benchmarks/activation_figures.py`` measures them on the
real classes at the real widths with 1 and 2 blocks at two resolutions, by counting the
distinct storages autograd saves during a forward (``torch.autograd.graph.saved_tensors_hooks``,
parameters and buffers excluded): the same count on CPU and GPU, exact for what the graph
keeps. Re-measure on a GPU (bf16 autocast figures differ between CPU and CUDA autocast) with

    python benchmarks/activation_figures.py --backbone sd3 --device cuda

which rewrites that backbone's entry. ``benchmarks/plan_accuracy.py`` compares the estimate
with the measured peak of real training steps (CSV in ``results/benchmarks/``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdmbench.errors import UserError

ASSETS = Path(__file__).parent / "backbones" / "assets"
FIGURES_FILE = ASSETS / "activation_figures.json"
GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}  # per trained parameter, both moments
LATENT_COPIES = 8  # float32 latents a step keeps per sample (module docstring)


@dataclass(frozen=True)
class Overheads:
    """Per-rank GPU memory outside PyTorch's tensors (module docstring), planned on CUDA only."""

    cuda_context_gb: float = 0.8  # driver context, kernel images, cuBLAS/cuDNN workspaces
    nccl_gb: float = 0.6  # NCCL's channel buffers, with several processes
    fragmentation: float = 0.10  # caching-allocator slack, a fraction of the per-step memory


# ----------------------------------------------------------------------------- inventory
@dataclass
class Model:
    """One model a run holds: its parameter and buffer counts and how it is kept."""

    name: str
    params: int
    buffers: int  # elements
    dtype: str
    trained: bool = False
    sharded: bool = True  # FSDP2 shards it (the core's models; not text encoders/VAE)
    offloaded: bool = False  # kept in CPU memory, run block by block
    largest_block: int = 0  # parameters of its largest wrapped block
    blocks: dict[str, int] = field(default_factory=dict)  # wrap class -> count


@dataclass
class Architecture:
    """What :func:`build_architecture` reads off a backbone built on the meta device."""

    backbone: str
    figures_key: str  # the entry of activation_figures.json (a twin reads its family's)
    transformer: nn.Module
    components: dict[str, nn.Module]  # text encoders, VAE
    image_tokens: int
    text_tokens: int
    dtype: str  # teacher, text encoders, VAE
    train_dtype: str  # student and its copies
    wrap: tuple[type, ...]
    device: str = "cuda"  # where the plan is for: "cuda" adds the GPU's overheads
    encoders_cached: bool = False  # embed_cache "disk": the text encoders leave the GPU


def _dtype_name(name: str, device: str) -> str:
    if name == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return name


def _figures_key(bb_cls: type) -> str:
    """The first name along the class hierarchy with measured activation figures."""
    for c in bb_cls.__mro__:
        if getattr(c, "name", None) in _all_figures():
            return c.name
    return bb_cls.name


def shipped_configs(bb_cls: type) -> dict[str, Any]:
    """The full-size component configs a backbone ships (the first ``plan_<name>.json``
    along its class hierarchy): for planning, and for building its real architecture offline."""
    for c in bb_cls.__mro__:
        path = ASSETS / f"plan_{getattr(c, 'name', '')}.json"
        if path.is_file():
            return json.loads(path.read_text())
    raise UserError(
        f"backbone '{bb_cls.name}' ships no plan configuration "
        f"(cdmbench/backbones/assets/plan_{bb_cls.name}.json); plan supports sd3 and longcat"
    )


def _build(cls: type, cfg: dict[str, Any]) -> nn.Module:
    """A diffusers or transformers model from its config dict (call under a meta device)."""
    if hasattr(cls, "from_config") and not hasattr(cls, "config_class"):
        return cls.from_config(cfg)
    return cls(cls.config_class(**cfg))


def build_architecture(bb_cls: type, settings: Any, device: str = "cuda") -> Architecture:
    """Every model of the backbone on the meta device, with the settings' resolution, text
    length and dtypes (``device``: where the plan is for; ``auto`` dtypes follow it)."""
    info = shipped_configs(bb_cls)
    parts = [n for n in bb_cls.classes if not n.startswith("tokenizer") and n != "scheduler"]
    if getattr(settings, "drop_t5", False):
        parts = [n for n in parts if n != "text_encoder_3"]
    with torch.device("meta"):
        if hasattr(bb_cls, "tiny_builders"):  # tiny twins: their own builders, the real models
            builders = bb_cls.tiny_builders()
            models = {n: builders[n]() for n in parts if n in builders}
        else:
            cfgs = info["components"]
            models = {n: _build(bb_cls.classes[n], cfgs[n]) for n in parts if n in cfgs}
    res = settings.resolution
    h, w = (res, res) if isinstance(res, int) else res
    px = 8 * info.get("image_patch", 2)
    text = info.get("text_tokens", {})
    n_text = int(text.get("fixed", 0)) + int(
        getattr(settings, text["setting"], 0) if "setting" in text else 0
    )
    transformer = models.pop("transformer")
    return Architecture(
        backbone=bb_cls.name,
        figures_key=_figures_key(bb_cls),
        transformer=transformer,
        components=models,
        image_tokens=(h // px) * (w // px),
        text_tokens=n_text,
        dtype=_dtype_name(settings.dtype, device),
        train_dtype=_dtype_name(
            settings.dtype if settings.train_dtype == "auto" else settings.train_dtype, device
        ),
        wrap=tuple(bb_cls.fsdp_wrap_classes),
        device=device,
        encoders_cached=getattr(settings, "embed_cache", "online") == "disk",
    )


def _count(model: nn.Module, wrap: tuple[type, ...]) -> tuple[int, int, int, dict[str, int]]:
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    blocks = [m for m in model.modules() if wrap and isinstance(m, wrap)]
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=params)
    kinds: dict[str, int] = {}
    for b in blocks:
        kinds[type(b).__name__] = kinds.get(type(b).__name__, 0) + 1
    return params, buffers, largest, kinds


def inventory(arch: Architecture, method_cls: type, offload_frozen: bool = False) -> list[Model]:
    """Teacher, student, EMA, the method's auxiliary models, text encoders and VAE."""
    p, b, largest, kinds = _count(arch.transformer, arch.wrap)
    out = [
        Model(
            "teacher",
            p,
            b,
            arch.dtype,
            offloaded=offload_frozen,
            largest_block=largest,
            blocks=kinds,
        ),
        Model("student", p, b, arch.train_dtype, trained=True, largest_block=largest, blocks=kinds),
        Model("ema", p, b, arch.train_dtype, largest_block=largest, blocks=kinds),
    ]
    for name, trained in method_cls.aux_models.items():
        out.append(
            Model(
                name, p, b, arch.train_dtype, trained=trained, largest_block=largest, blocks=kinds
            )
        )
    for name, m in arch.components.items():
        cp, cb, _, _ = _count(m, ())
        away = offload_frozen or (arch.encoders_cached and name.startswith("text_encoder"))
        out.append(Model(name, cp, cb, arch.dtype, sharded=False, offloaded=away))
    return out


# --------------------------------------------------------------------------- activations
@lru_cache(maxsize=1)
def _all_figures() -> dict[str, Any]:
    return json.loads(FIGURES_FILE.read_text()) if FIGURES_FILE.is_file() else {}


def activation_figures(backbone: str, dtype: str, checkpointing: bool) -> dict[str, Any]:
    """The measured per-token figures of ``backbone`` (see the module docstring)."""
    entry = _all_figures().get(backbone)
    if entry is None:
        raise UserError(
            f"no activation figures for backbone '{backbone}'; measure them with "
            f"`python benchmarks/activation_figures.py --backbone {backbone}`"
        )
    table = entry.get(dtype) or entry.get("float32")
    return table["checkpointing" if checkpointing else "full"] | {"base_blocks": entry["blocks"]}


def forward_bytes(fig: dict[str, Any], blocks: dict[str, int], img: int, txt: int) -> float:
    """Bytes one forward with gradients saves per sample."""
    img_b, txt_b = fig["base"]
    for kind, n in blocks.items():
        extra = n - fig["base_blocks"].get(kind, 0)
        per = fig["per_block"].get(kind, [0.0, 0.0])
        img_b += extra * per[0]
        txt_b += extra * per[1]
    return img * img_b + txt * txt_b


def latent_bytes(arch: Architecture) -> float:
    """Bytes of one sample's float32 latent: the transformer's input features per image token
    (channels x patch area) times the image tokens."""
    cfg = arch.transformer.config
    return 4.0 * arch.image_tokens * cfg["in_channels"] * cfg.get("patch_size", 1) ** 2


def cond_bytes(arch: Architecture) -> float:
    """Bytes of one sample's text conditioning (token embeddings and a pooled vector) in the
    text encoders' dtype."""
    cfg = arch.transformer.config
    width = cfg["joint_attention_dim"] * arch.text_tokens + cfg.get("pooled_projection_dim", 0)
    return float(DTYPE_BYTES[arch.dtype] * width)


def block_bytes(fig_full: dict[str, Any], img: int, txt: int) -> float:
    """Bytes one block saves per sample (the largest kind), without checkpointing."""
    per = max(fig_full["per_block"].values(), key=lambda v: v[0] + v[1])
    return img * per[0] + txt * per[1]


# ---------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Per-rank memory of a configuration, in bytes, by what holds it."""

    rows: dict[str, float]  # what -> bytes per rank
    models: list[Model]
    gpus: int
    sharded: bool
    batch: int  # per process per update (micro-batch x grad_accum)
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    offload_frozen: bool
    optimizer: str
    tokens: tuple[int, int]  # image, text

    @property
    def total(self) -> float:
        return sum(self.rows.values())


def estimate(
    arch: Architecture,
    method_cls: type,
    batch: int,
    gpus: int = 1,
    shard: str = "auto",
    checkpointing: bool = True,
    grad_accum: int = 1,
    offload_frozen: bool = False,
    optimizer: str = "adamw",
    figures_dtype: str | None = None,
    overheads: Overheads | None = None,
) -> Plan:
    """Per-rank bytes of training ``method_cls`` on ``arch`` with ``batch`` samples per
    micro-batch on each of ``gpus`` processes; on CUDA with ``overheads`` (default
    :class:`Overheads`)."""
    sharded = gpus > 1 and shard in ("fsdp2", "auto")
    n = gpus if sharded else 1
    models = inventory(arch, method_cls, offload_frozen)
    nbytes = DTYPE_BYTES
    rows: dict[str, float] = {}
    for m in models:
        if m.offloaded:
            continue
        rows[f"weights: {m.name}"] = m.params * nbytes[m.dtype] / (n if m.sharded else 1)
    rows["buffers"] = sum(m.buffers * nbytes[m.dtype] for m in models if not m.offloaded)
    trained = [m for m in models if m.trained]
    rows["gradients"] = sum(m.params * nbytes[m.dtype] for m in trained) / n
    rows["optimizer"] = sum(m.params * OPTIMIZER_BYTES[optimizer] for m in trained) / n
    gathered = [m for m in models if m.sharded and (sharded or m.offloaded)]
    rows["gathered blocks"] = max(
        (2 * m.largest_block * nbytes[m.dtype] for m in gathered), default=0.0
    )
    compute = figures_dtype or (arch.dtype if arch.dtype != arch.train_dtype else arch.train_dtype)
    fig = activation_figures(arch.figures_key, compute, checkpointing)
    fig_full = activation_figures(arch.figures_key, compute, False)
    img, txt = arch.image_tokens, arch.text_tokens
    student = next(m for m in models if m.name == "student")
    per_forward = batch * forward_bytes(fig, student.blocks, img, txt)
    casts = 0.0
    if nbytes[arch.train_dtype] > nbytes[compute]:  # autocast keeps low-precision weight copies
        kept = student.largest_block if checkpointing else student.params
        casts = kept * nbytes[compute]
    forwards = max(method_cls.grad_forwards.values())
    # the widest moment outside the saved activations: a block's backward holds its own
    # activations (recomputed under checkpointing) and as much again for their gradients; a
    # no-grad forward at the CFG batch 2B holds at most one block's intermediates
    working = 2 * batch * block_bytes(fig_full, img, txt)
    rows["activations"] = forwards * (per_forward + casts) + working
    rows["latents, conditions"] = batch * (
        LATENT_COPIES * latent_bytes(arch) + 2 * cond_bytes(arch)
    )
    if arch.device == "cuda":
        o = overheads or Overheads()
        per_step = rows["activations"] + rows["gathered blocks"] + rows["latents, conditions"]
        rows["allocator slack"] = o.fragmentation * per_step
        rows["CUDA context"] = o.cuda_context_gb * GB
        if gpus > 1:
            rows["NCCL buffers"] = o.nccl_gb * GB
    return Plan(
        rows,
        models,
        gpus,
        sharded,
        batch * grad_accum,
        batch,
        grad_accum,
        checkpointing,
        offload_frozen,
        optimizer,
        (img, txt),
    )


def largest_batch(fits, start: int = 1, limit: int = 4096) -> int:
    """The largest b >= 1 with ``fits(b)`` (0 when not even 1 fits); fits is monotone."""
    if not fits(start):
        return 0
    lo, hi = start, start
    while hi < limit and fits(hi * 2):
        hi *= 2
    lo, hi = hi, min(hi * 2, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass
class Remedy:
    """A change that makes the configuration fit, with its plan."""

    grad_accum: int
    offload_frozen: bool
    optimizer: str
    plan: Plan
    embed_cache_disk: bool = False

    def sets(self, optimizer: str) -> list[str]:
        """The ``--set`` values (``optimizer``: the configured one)."""
        out = []
        if self.grad_accum > 1:
            out += [f"train.batch={self.plan.micro_batch}", f"train.grad_accum={self.grad_accum}"]
        if self.embed_cache_disk:
            out.append("backbone.embed_cache=disk")
        if self.offload_frozen:
            out.append("backbone.offload_frozen=true")
        if self.optimizer != optimizer:
            out.append(f"train.optimizer={self.optimizer}")
        return out


def remedies(
    plan_fn, batch: int, capacity: float, optimizer: str = "adamw", disk_cache: bool = False
) -> list[Remedy]:
    """Ways to fit ``batch`` samples per update, fewest changes first: gradient accumulation
    (the same effective batch in k micro-batches of batch / k, the smallest k dividing batch
    that fits), then (``disk_cache``: the text encoders could leave the GPU) with the
    embeddings cached on disk, then with the frozen models offloaded, then with 8-bit AdamW
    states. ``plan_fn(micro_batch, grad_accum, offload, optimizer, cached)`` -> Plan."""
    found: list[Remedy] = []
    placements = [(False, False)] + (
        [(True, False), (True, True)] if disk_cache else [(False, True)]
    )
    levers = [(c, off, optimizer) for c, off in placements]
    if optimizer != "adamw8bit":
        levers += [(c, off, "adamw8bit") for c, off in placements]
    for cached, offload, opt in levers:
        for k in [d for d in range(1, batch + 1) if batch % d == 0]:
            p = plan_fn(batch // k, k, offload, opt, cached)
            if p.total <= capacity:
                if k > 1 or offload or cached or opt != optimizer:
                    found.append(Remedy(k, offload, opt, p, cached))
                break
        if found:
            break  # the first lever set that fits; more levers would cost speed for nothing
    return found


def fmt_gb(x: float) -> str:
    return f"{x / GB:.1f}"


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
