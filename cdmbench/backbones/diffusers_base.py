"""What the diffusers backbones (`sd3`, `longcat` and their tiny twins) share.

- Weights: ``backbone.weights`` is a local diffusers pipeline directory or a hub id
  (``owner/name``, at ``backbone.revision``), else ``$<weights_env>``, else the family's hub
  id. A hub id is read from the local Hugging Face cache first and downloaded
  (``snapshot_download``, only the components the configuration uses) when not cached and the
  hub is reachable. Offline (``HF_HUB_OFFLINE=1``) or with the hub unreachable it fails in
  seconds (:mod:`cdmbench.weights`). Every failure is one :class:`MissingWeightsError` whose
  one-line message says what to fetch.
- Identity: a run's hash holds the hub id and the commit actually loaded, or the local
  folder's fingerprint (:func:`cdmbench.backbones.base.weights_fingerprint`).
- Dtypes: ``dtype`` (teacher, text encoders, VAE; ``auto``: bfloat16 on GPU, float32
  elsewhere) and ``train_dtype`` (the student and its copies: float32 master weights by
  default, run under autocast in ``dtype`` on GPU).
- Weights: one setting for every component. A local directory must hold every component
  the configuration uses (one error naming the missing subfolders); it is never completed
  from the hub.
- Prompts: training prompts by packaged set name or a file of any size, read on demand
  (:func:`cdmbench.prompts_io.open_prompt_source`), evaluation prompts by name or file; the
  packaged defaults are the disjoint halves ``general-train`` and ``general-test``.
  Embeddings are computed online by the pipeline's own ``encode_prompt``, ``encode_batch``
  texts per call (a partial call is padded with "" to that size, so an embedding does not
  depend on the other prompts of its call), and kept per prompt text on the CPU (LRU,
  ``embed_cache_size`` texts): host and GPU memory do not grow with the number of prompts.
  With ``embed_cache = "disk"`` training first builds (once; sharded across ranks) a
  memory-mapped store of every training prompt's embedding (:mod:`cdmbench.embed_cache`),
  reads batches from it and moves the text encoders off the GPU.
- Tiny twins: the same classes from small configs with seeded random weights, offline.

A family subclasses :class:`DiffusersBackbone` and keeps only what is its own: component
classes, the text-encoder call, the network call's conventions, decoding, export.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cdmbench.backbones.base import (
    MAX_EVAL_BATCH,
    Backbone,
    BackboneSettings,
    Cond,
    weights_fingerprint,
)
from cdmbench.distributed import rank_world
from cdmbench.errors import MissingWeightsError, UserError
from cdmbench.prompts_io import (
    Prompt,
    PromptFile,
    load_prompt_set,
    open_prompt_source,
    prompt_overlap,
    prompt_set_hash,
)
from cdmbench.settings import MAX_COUNT, setting

DTYPES = ("auto", "float32", "bfloat16", "float16")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name on the Hugging Face hub
# files a diffusers directory may hold that no loader here reads
IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*.onnx*", "*fp16*"]
# diffusers' attention projections: image stream, and the text stream of joint (MMDiT) blocks
LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


# ------------------------------------------------------------------------------ weights
def is_hub_id(spec: str) -> bool:
    """'owner/name' that is not an existing local path."""
    return HUB_ID.fullmatch(spec) is not None and not Path(spec).expanduser().exists()


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def dtype_kwarg(cls: type) -> str:
    """transformers >= 5 takes ``dtype=``; diffusers and older transformers ``torch_dtype=``."""
    if cls.__module__.startswith("transformers"):
        return "dtype" if transformers_major() >= 5 else "torch_dtype"
    return "torch_dtype"


def param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's first parameter (diffusers' ``.dtype`` walks every module)."""
    return next(model.parameters()).dtype


def place(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """``module`` on ``device`` in ``dtype``, casting only when needed (diffusers warns on
    every dtype cast through ``.to``)."""
    module = module.to(device)
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module = module.to(dtype)
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP/FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto``: bfloat16 on GPU, float32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DiffusersSettings(BackboneSettings):
    """Settings of every diffusers backbone; a family changes defaults and adds its own."""

    weights: str | None = None  # diffusers directory or hub id; None: $<ENV>, else the hub id
    revision: str | None = None  # hub branch, tag or commit; None: main
    dtype: str = setting("auto", choices=DTYPES)  # teacher, text encoders, VAE
    train_dtype: str = setting("float32", choices=DTYPES)  # student and copies; auto: = dtype
    resolution: int = setting(1024, ge=16, le=16384)  # image side in pixels
    # recompute activations in the backward of trained copies: less memory, the same
    # gradients; not hashed, so a run can be resumed with it switched on to fit fewer GPUs
    gradient_checkpointing: bool = setting(False, hashed=False)
    train_prompts: str = "general-train"  # prompt set or file (any size) the trainer draws from
    test_prompts: str = setting("general-test", hashed=False)  # eval's "default"; disjoint
    # texts per text-encoder call (padded to it)
    encode_batch: int = setting(16, hashed=False, ge=1, le=MAX_EVAL_BATCH)
    # embeddings kept on the CPU (LRU)
    embed_cache_size: int = setting(1024, hashed=False, ge=1, le=MAX_COUNT)
    # training's text embeddings: "online", encoded per batch (the official code's way), or
    # "disk", encoded once into a memory-mapped store the run reads (the encoders then leave
    # the GPU); the same embeddings either way
    embed_cache: str = setting("online", hashed=False, choices=("online", "disk"))
    embed_cache_dir: str = setting("", hashed=False)  # the store's folder (every rank sees it);
    # "": <the runs folder of the backbone>/embeddings
    teacher_steps: int = 28
    teacher_guidance: float = 7.0
    # the frozen teacher, text encoders and VAE stay in CPU memory and move to the GPU block
    # by block for their own calls: slower, the same results, and a one-GPU run fits
    offload_frozen: bool = setting(False, hashed=False)
    # LoRA (peft) adapters on the student and fake score; 0: full fine-tune
    lora_rank: int = setting(0, ge=0, le=65536)
    lora_alpha: float = setting(0.0, ge=0)  # adapter scale alpha / rank; 0: alpha = rank
    lora_targets: tuple[str, ...] = LORA_TARGETS  # module names (or name suffixes) adapted

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("encode_batch", "embed_cache_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(
                    f"backbone.{name} must be a whole number >= 1, got {getattr(self, name)!r}"
                )
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise UserError(
                f"backbone.lora_rank must be a whole number >= 0, got {self.lora_rank!r}"
            )
        if self.lora_rank:
            try:
                import peft  # noqa: F401
            except ImportError:
                raise UserError(
                    "backbone.lora_rank needs peft (the lora extra): pip install peft"
                ) from None


def offload_to_cpu(module: nn.Module, device: str | torch.device) -> nn.Module:
    """Keep a frozen ``module`` in CPU memory and run it on ``device``: each of its units (a
    direct child; each block of a ``ModuleList``) moves to ``device`` for its forward and back
    after it, so at most one block is resident. Tensors held by the module itself stay on
    ``device``. Frozen modules only: an optimizer holds the tensors a move replaces."""

    def to_device(unit: nn.Module, args: Any) -> None:
        unit.to(device)

    def to_cpu(unit: nn.Module, args: Any, out: Any) -> None:
        unit.to("cpu")

    for unit in _units(module):
        unit.to("cpu")
        unit.register_forward_pre_hook(to_device)
        unit.register_forward_hook(to_cpu)
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        t.data = t.data.to(device)
    return module


def _units(module: nn.Module) -> list[nn.Module]:
    """The modules :func:`offload_to_cpu` moves: children, with containers opened."""
    out = []
    for child in module.children():
        if isinstance(child, nn.ModuleList | nn.ModuleDict):
            out += [m for m in child.children() if any(True for _ in m.parameters())]
        elif any(True for _ in child.parameters()):
            out.append(child)
    return out


class PromptCache:
    """Embeddings per prompt text on the CPU, least recently used evicted beyond ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: OrderedDict[str, dict[str, Tensor]] = OrderedDict()

    def __contains__(self, text: str) -> bool:
        return text in self.rows

    def keys(self):
        return self.rows.keys()

    def put(self, text: str, row: dict[str, Tensor]) -> None:
        self.rows[text] = {k: v.to("cpu") for k, v in row.items()}

    def get(self, text: str) -> dict[str, Tensor]:
        """A cached text's row, now the most recently used."""
        self.rows.move_to_end(text)
        return self.rows[text]

    def evict(self, keep: int = 0) -> None:
        """Drop the least recently used rows beyond ``max(size, keep)``."""
        while len(self.rows) > max(self.size, keep):
            self.rows.popitem(last=False)


# ----------------------------------------------------------------------------- backbone
class DiffusersBackbone(Backbone):
    """A diffusers pipeline's components behind the backbone contract; see the module doc.

    Subclasses set ``label``, ``hub_id``, ``weights_env``, ``classes`` (component name ->
    class, the transformer included) and implement :meth:`_encode_texts`.
    """

    Settings: ClassVar[type[DiffusersSettings]] = DiffusersSettings
    label: ClassVar[str] = "diffusers"  # the family's name in messages
    hub_id: ClassVar[str] = ""
    weights_env: ClassVar[str] = ""
    classes: ClassVar[dict[str, Any]] = {}

    def __init__(self, device: str = "cpu", settings: Any = None, **kwargs: Any) -> None:
        super().__init__(device, settings, **kwargs)
        s = self.settings
        self.dtype = resolve_dtype(s.dtype, self.device)
        self.train_dtype = (
            self.dtype if s.train_dtype == "auto" else resolve_dtype(s.train_dtype, "cpu")
        )
        self.weights = self.default_weights() if s.weights is None else s.weights
        if (
            self.weights is not None
            and not is_hub_id(self.weights)
            and not Path(self.weights).expanduser().is_dir()
        ):
            path = Path(self.weights).expanduser()
            what = (
                "are a file, not a diffusers pipeline directory" if path.exists() else "not found"
            )
            raise self.missing(f"weights {path} {what}")
        self._root: Path | None = None
        self._parts: dict[str, Any] = {}
        self._embeds = PromptCache(s.embed_cache_size)
        self._stores: list[Any] = []  # embedding stores on disk (embed_cache = "disk")
        self._encoders_away = False  # the text encoders were moved off the device
        self._null: dict[str, Tensor] | None = None
        self._prompt_sets: dict[str, Sequence[Prompt]] = {}

    # ------------------------------------------------------------------------- weights
    def default_weights(self) -> str | None:
        """``$<weights_env>``, else the hub id; None for weights built in code."""
        return os.environ.get(self.weights_env) or self.hub_id

    def missing(self, what: str, spec: str | None = None) -> MissingWeightsError:
        """A one-line error: ``<label> <what>; <how to fetch them>``."""
        spec = self.weights if spec is None else spec
        repo = spec if spec and is_hub_id(spec) else self.hub_id
        return MissingWeightsError(
            f"{self.label} {what}; fetch them with `hf download {repo}` (a gated repo: accept "
            f"its licence on huggingface.co and run `hf auth login` first), or set "
            f"backbone.weights to a local diffusers directory (or ${self.weights_env})"
        )

    @property
    def parts(self) -> tuple[str, ...]:
        """The pipeline components this configuration uses."""
        return tuple(self.classes)

    @property
    def weights_dir(self) -> Path | None:
        """The local diffusers directory (resolved, downloaded if allowed) or None."""
        if self.weights is None:
            return None
        if self._root is None:
            self._root = self.resolve(self.weights, self.parts)
        return self._root

    def resolve(self, spec: str, parts: Sequence[str]) -> Path:
        """The local directory holding ``parts`` of the pipeline ``spec`` names."""
        if not is_hub_id(spec):
            path = Path(spec).expanduser()
            if not path.is_dir():
                raise self.missing(f"weights {path} not found", spec)
            lack = [p + "/" for p in parts if not (path / p).is_dir()]
            if not (path / "model_index.json").is_file():
                lack.insert(0, "model_index.json")
            if lack:
                raise self.missing(f"weights in {path} lack {', '.join(lack)}", spec)
            return path
        from huggingface_hub import snapshot_download

        kw = dict(
            revision=self.settings.revision,
            allow_patterns=["model_index.json", *(f"{p}/*" for p in parts)],
            ignore_patterns=IGNORE,
        )
        try:
            return Path(snapshot_download(spec, local_files_only=True, **kw))
        except Exception:  # not cached: try the hub below
            pass
        from cdmbench.weights import hub_endpoint, unavailable

        why = unavailable(hub_endpoint())
        if why is None:
            try:
                return Path(snapshot_download(spec, **kw))
            except Exception as e:  # gated, missing, dropped connection: all one user error
                why = type(e).__name__
        raise self.missing(
            f"weights '{spec}' are not in the local Hugging Face cache and "
            f"could not be downloaded ({why})",
            spec,
        )

    def teacher_id(self, weights: str | None = None) -> str:
        """``hf:<hub id>@<commit>`` for hub weights, a folder or file fingerprint for local
        ones; the backbone's own weights when ``weights`` is None."""
        spec = self.weights if weights is None else os.fspath(weights)
        if spec is None:
            return super().teacher_id(None)
        if is_hub_id(spec):
            root = self.resolve(spec, ["transformer"] if weights is not None else self.parts)
            commit = root.name if root.parent.name == "snapshots" else self.settings.revision
            return f"hf:{spec}@{commit or 'main'}"
        return weights_fingerprint(spec)

    def component_config(self, name: str) -> dict[str, Any]:
        """A component's config, read without loading weights (a hub id: that file only)."""
        cls = self.classes[name]
        src = self._root or (self.weights if is_hub_id(self.weights) else self.weights_dir)
        kw: dict[str, Any] = {}
        if self._root is None and is_hub_id(self.weights):
            from cdmbench.weights import hub_endpoint, unavailable

            kw["local_files_only"] = unavailable(hub_endpoint()) is not None  # the cache, fast
        try:
            return dict(cls.load_config(src, subfolder=name, revision=self.settings.revision, **kw))
        except Exception as e:
            raise self.missing(
                f"{name} config not readable from {src} ({type(e).__name__})"
            ) from None

    def load_part(
        self, name: str, root: str | Path | None = None, subfolder: str | None = ""
    ) -> Any:
        """One component as stored (on the CPU, models in ``dtype``)."""
        cls = self.classes[name]
        plain = name.startswith("tokenizer") or name == "scheduler"
        kwargs = {} if plain else {dtype_kwarg(cls): self.dtype}
        root = self.weights_dir if root is None else root
        try:
            sub = name if subfolder == "" else subfolder
            return cls.from_pretrained(root, subfolder=sub, **kwargs)
        except OSError as e:
            raise self.missing(
                f"component '{name}' is missing or unreadable under {root} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            ) from None

    def _load(self, name: str) -> Any:
        """A component as stored; tiny twins build theirs."""
        return self.load_part(name)

    def component(self, name: str) -> Any:
        """A frozen component (loaded once) on the backbone's device; None where this
        configuration does not use it. Not the transformer: see :meth:`load_teacher`."""
        if name == "transformer":
            raise ValueError("the transformer is not shared: use load_teacher()")
        if name not in self.parts:
            return None
        if name not in self._parts:
            part = self._load(name)
            if isinstance(part, nn.Module):
                home = "cpu" if self.settings.offload_frozen else self.device
                part = place(part, home, self.dtype).eval().requires_grad_(False)
                if name == "vae" and self.use_channels_last():
                    part = part.to(memory_format=torch.channels_last)
                self.offload(part)
            self._parts[name] = part
        return self._parts[name]

    def transformer_config(self) -> dict[str, Any]:
        return self.component_config("transformer")

    # -------------------------------------------------------------------------- models
    def load_teacher(self, weights: str | os.PathLike | None = None) -> nn.Module:
        """A fresh frozen denoiser (a new module each call: ``load_run`` loads a student's
        state into it): the backbone's own, or ``weights``: a pipeline or transformer
        directory, a hub id, or a safetensors state dict of this architecture."""
        model = self._load("transformer") if weights is None else self._load_transformer(weights)
        return place(model, self.device, self.dtype).eval().requires_grad_(False)

    def _load_transformer(self, weights: str | os.PathLike) -> nn.Module:
        spec = os.fspath(weights)
        path = Path(spec).expanduser()
        if path.is_file():  # a state dict for this architecture (a saved student)
            from safetensors.torch import load_file

            with torch.random.fork_rng(devices=[]):  # construction draws; the state replaces them
                model = self.classes["transformer"].from_config(self.transformer_config())
            try:
                model.load_state_dict(load_file(str(path)))
            except Exception as e:
                raise self.missing(
                    f"cannot read transformer weights {path} ({type(e).__name__}); "
                    "pass a safetensors state dict of the backbone's transformer",
                    spec,
                ) from None
            return model
        if path.is_dir() and (path / "config.json").is_file():
            return self.load_part("transformer", path, subfolder=None)
        return self.load_part("transformer", self.resolve(spec, ["transformer"]))

    def make_student(self, teacher: nn.Module) -> nn.Module:
        """A trainable copy of the teacher in ``train_dtype``; with ``lora_rank``, LoRA
        adapters on ``lora_targets`` are its only trainable parameters (B = 0: it starts as
        the teacher)."""
        student = place(self.clone(teacher), self.device, self.train_dtype)
        if self.settings.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        student.requires_grad_(True).train()
        if self.settings.lora_rank:
            student.add_adapter(self.lora_config())
            self.mark_trainable(student)
        return student

    def lora_config(self):
        """The peft ``LoraConfig`` of the student's adapters (Hu et al. 2021, arXiv 2106.09685)."""
        from peft import LoraConfig

        s = self.settings
        return LoraConfig(
            r=s.lora_rank,
            lora_alpha=s.lora_alpha or s.lora_rank,
            target_modules=list(s.lora_targets),
        )

    def _feature_block(self, model: nn.Module) -> nn.Module:
        """The block ending the first half of the transformer's stack (double-stream blocks,
        then single-stream ones where the family has them)."""
        net = unwrap(model)
        blocks = [*net.transformer_blocks, *getattr(net, "single_transformer_blocks", ())]
        return blocks[max(len(blocks) // 2 - 1, 0)]

    def feature_width(self, model: nn.Module) -> int:
        cfg = unwrap(model).config
        return cfg.num_attention_heads * cfg.attention_head_dim

    def features(self, model: nn.Module, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        """The image tokens' hidden states after the middle block (every block of both
        families returns (text, image) states), averaged over tokens: [B, inner width]."""
        out = self._hooked(self._feature_block(model), model, x, s, cond, lambda o: o[1])
        return out.float().mean(dim=1)

    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the images the backbone generates."""
        res = self.settings.resolution
        return (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))

    def mark_trainable(self, model: nn.Module) -> None:
        """With LoRA, only the adapters train; otherwise every parameter."""
        if self.settings.lora_rank:
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)

    def offload(self, model: nn.Module) -> None:
        """``offload_frozen``: ``model`` in CPU memory, run block by block on the device."""
        if self.settings.offload_frozen:
            offload_to_cpu(model, self.device)

    def plain_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The weights with the adapters merged in (W + alpha / r B A), as the teacher's keys."""
        if not self.settings.lora_rank:
            return model.state_dict()
        merged = copy.deepcopy(unwrap(model))
        merged.fuse_lora()
        merged.unload_lora()
        return merged.state_dict()

    def adapter_state(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The LoRA weights as peft names them (``<module>.lora_A.weight``); None without."""
        if not self.settings.lora_rank:
            return None
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(unwrap(model))

    def autocast(self, model_dtype: torch.dtype, device: torch.device):
        """bf16/fp16 autocast for a float32 student on GPU; nothing otherwise."""
        if (
            device.type == "cuda"
            and model_dtype != self.dtype
            and self.dtype in (torch.bfloat16, torch.float16)
        ):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    # -------------------------------------------------------------------- conditioning
    def prompts(self, split: str = "train") -> Sequence[Prompt]:
        """The training prompts (``train_prompts``: a sequence that reads a prompt file on
        demand) or the evaluation ones (``test_prompts``, a list)."""
        if split not in ("train", "test", "all"):
            raise ValueError(f"unknown split '{split}' (train, test, all)")
        if split == "train":
            name = self.settings.train_prompts
            if name not in self._prompt_sets:
                self._prompt_sets[name] = open_prompt_source(name)
            source = self._prompt_sets[name]
            return list(source) if isinstance(source, list) else source  # a list: a copy
        name = self.settings.test_prompts
        if name not in self._prompt_sets:
            self._prompt_sets[name] = load_prompt_set(name)[1]
        return list(self._prompt_sets[name])

    def warn_prompt_overlap(self, prompts: Sequence[Prompt] | None = None) -> int:
        """Warn (one line on stderr, from the main process) when evaluation ``prompts``
        (default: ``eval_prompts``) are among the training prompts: scores on prompts the
        student was trained on overstate it. The count."""
        if prompts is None:
            prompts = load_prompt_set(self.settings.eval_prompts, backbone=self)[1]
        n = prompt_overlap(self.prompts("train"), prompts)
        if n and rank_world()[0] == 0:
            print(
                f"warning: {n} of the {len(prompts)} evaluation prompts are among the training "
                f"prompts ({self.settings.train_prompts}); evaluate on a disjoint set",
                file=sys.stderr,
                flush=True,
            )
        return n

    def _encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        """The pipeline's ``encode_prompt`` on ``texts``: the Cond tensors, batch first."""
        raise NotImplementedError

    def embed(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Cond tensors of ``texts`` on the device, each text encoded once and cached.

        Texts in an embedding store (:meth:`prepare_embeddings`) are read from it; the others
        are encoded with every text-encoder call of ``encode_batch`` rows (padded with ""), so
        a text's embedding is computed by the same kernels whichever texts share its call.
        Runs outside inference mode, so cached embeddings can feed training graphs later.
        """
        stored: dict[str, dict[str, Tensor]] = {}
        for t in dict.fromkeys(texts):
            row = next((r for st in self._stores if (r := st.get(t)) is not None), None)
            if row is not None:
                stored[t] = row
        todo = list(dict.fromkeys(t for t in texts if t not in stored and t not in self._embeds))
        if todo and self._encoders_away:
            self._move_text_encoders(self.device)
        size = self.settings.encode_batch
        for i in range(0, len(todo), size):
            chunk = todo[i : i + size]
            out = self._encode_padded(chunk)
            for j, t in enumerate(chunk):
                self._embeds.put(t, {k: v[j] for k, v in out.items()})
        rows = [stored[t] if t in stored else self._embeds.get(t) for t in texts]
        self._embeds.evict(keep=len(texts))
        out = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return {k: v.to(self.device, self.dtype) for k, v in out.items()}

    def _encode_padded(self, chunk: list[str]) -> dict[str, Tensor]:
        """One text-encoder call on ``chunk`` padded with "" to ``encode_batch`` rows."""
        with torch.inference_mode(False), torch.no_grad():
            return self._encode_texts(chunk + [""] * (self.settings.encode_batch - len(chunk)))

    def prepare_embeddings(self, cache_dir: str | Path, extra: Sequence[Prompt] = ()) -> None:
        """With ``embed_cache = "disk"``: open, or first build, the embedding stores of the
        training prompts and of "" and ``extra`` (prompts training samples on), in
        ``embed_cache_dir`` (else ``cache_dir``); then move the text encoders off the GPU.
        A collective under several processes. Nothing with ``embed_cache = "online"``."""
        if self.settings.embed_cache != "disk":
            return
        from cdmbench.embed_cache import open_or_build, store_key

        root = Path(self.settings.embed_cache_dir or cache_dir).expanduser()
        ident = self.embed_identity()
        train = self.prompts("train")
        if isinstance(train, PromptFile):
            source: dict[str, Any] = {"file_sha256": train.sha256, "format": train.fmt}
        else:
            source = {"prompts": prompt_set_hash(train)}
        texts = _Texts(train)
        others = list(dict.fromkeys(["", *(p.text for p in extra)]))
        size = self.settings.encode_batch
        self._stores = [
            open_or_build(
                root / store_key({"source": source, "n": len(texts), "encoders": ident}),
                texts,
                self._encode_padded,
                size,
            ),
            open_or_build(
                root / store_key({"texts": others, "encoders": ident}),
                others,
                self._encode_padded,
                size,
            ),
        ]
        self._move_text_encoders("cpu")

    def embed_identity(self) -> dict[str, Any]:
        """What a text's embedding depends on besides the text: the weights, the dtype, the
        call size and the device type, and the family's own settings (e.g. SD3's
        ``max_sequence_length`` and ``drop_t5``, a tiny twin's seed)."""
        s = self.settings
        shared = {f.name for f in dataclasses.fields(DiffusersSettings)}
        own = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in shared}
        return {
            "backbone": self.name,
            "weights": self.teacher_id(),
            "revision": s.revision,
            "dtype": str(self.dtype),
            "encode_batch": s.encode_batch,
            "device": torch.device(self.device).type,
            **own,
        }

    def _move_text_encoders(self, device: str | torch.device) -> None:
        """The loaded text encoders to ``device`` (in place: the pipelines holding them follow);
        with ``offload_frozen`` they already live on the CPU."""
        self._encoders_away = torch.device(device) != torch.device(self.device)
        if self.settings.offload_frozen:
            return
        for name, part in self._parts.items():
            if name.startswith("text_encoder") and isinstance(part, nn.Module):
                part.to(device)
        if self._encoders_away and torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()

    def null_cond(self) -> dict[str, Tensor]:
        """The unconditional input: the pipeline's negative prompt "", batch of 1."""
        if self._null is None:
            self._null = self.embed([""])
        return self._null

    def encode(self, prompts: Sequence[Prompt]) -> Cond:
        return Cond(self.embed([p.text for p in prompts]), self.null_cond())

    def generation_settings(self) -> dict:
        """The base settings plus where the text encoders come from and how they run."""
        return {**super().generation_settings(), "weights": self.weights}


class _Texts(Sequence[str]):
    """The texts of a prompt sequence, read on demand."""

    def __init__(self, prompts: Sequence[Prompt]) -> None:
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i):  # type: ignore[override]
        return self.prompts[i].text


# ---------------------------------------------------------------------------- tiny twins
class TinyTwin:
    """Mixin for a family's tiny twin: its components from small configs with seeded random
    weights, built offline; the same weights every call (a fresh module each time).

    The twin lists its random modules' constructors in :meth:`tiny_builders` (called in
    that order under one seed, with the global RNG left as it was) and its other parts
    (tokenizers, scheduler) in :meth:`tiny_plain`. ``backbone.weights`` still loads a
    directory (an exported tiny pipeline) instead.
    """

    weights: str | None
    settings: Any

    def default_weights(self) -> str | None:
        """None: random tiny weights, built in code."""
        return None

    @classmethod
    def tiny_builders(cls) -> dict[str, Callable[[], nn.Module]]:
        raise NotImplementedError

    @classmethod
    def tiny_plain(cls) -> dict[str, Any]:
        """Tokenizers and the scheduler (cache it: tokenizers are shared, never changed)."""
        return {}

    @classmethod
    def tiny_configs(cls) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def component_config(self, name: str) -> dict[str, Any]:
        if self.weights is not None:
            return super().component_config(name)  # type: ignore[misc]
        return dict(self.tiny_configs()[name])

    def _load(self, name: str) -> Any:
        if self.weights is not None:
            return super()._load(name)  # type: ignore[misc]
        builders = self.tiny_builders()
        if name not in builders:  # a scheduler has state a pipeline call changes: a copy
            part = self.tiny_plain()[name]
            return part if name.startswith("tokenizer") else copy.deepcopy(part)
        with torch.random.fork_rng(devices=[]):  # construction draws; the state replaces them
            module = builders[name]()
        module.load_state_dict(tiny_states(type(self), self.settings.seed)[name])
        return module.eval()


@lru_cache(maxsize=8)
def tiny_states(cls: type[TinyTwin], seed: int) -> dict[str, dict[str, Tensor]]:
    """The tiny twin's random weights from ``seed``, once per process (global RNG untouched)."""
    return build_tiny_states(cls, seed)


def build_tiny_states(cls: type[TinyTwin], seed: int) -> dict[str, dict[str, Tensor]]:
    """:func:`tiny_states` without the cache."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = {k: build() for k, build in cls.tiny_builders().items()}
    return {
        k: {n: v.detach().clone() for n, v in m.state_dict().items()} for k, m in modules.items()
    }
