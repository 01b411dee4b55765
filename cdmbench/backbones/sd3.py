"""`sd3` and `tiny-sd3`: Stable Diffusion 3 Medium through diffusers (Esser et al. 2024,
arXiv 2403.03206), and a tiny randomly initialised copy of it for offline tests.

Components are those of diffusers' ``StableDiffusion3Pipeline``: the MMDiT denoiser
``SD3Transformer2DModel`` (teacher, student and fake score are copies of it), the
``FlowMatchEulerDiscreteScheduler`` config (shift 3.0), the 16-channel ``AutoencoderKL``,
two CLIP text encoders with projection and T5-XXL, with their tokenizers.

How the pipeline's conventions map onto cdmbench's (DESIGN.md section 2):

- The network is called as the pipeline calls it: ``timestep`` is the scheduler's
  ``timesteps`` entry, i.e. 1000 * sigma (``flow.timestep``), latents in the network's dtype.
- ``set_timesteps(sigmas=...)`` applies the time shift s' = k s / (1 + (k - 1) s) to custom
  sigma lists too (diffusers 0.42, ``FlowMatchEulerDiscreteScheduler.set_timesteps``), then
  appends 0. So ``flow.uniform_schedule(n, 3.0)`` is what the pipeline runs with
  ``sigmas=[1, (n-1)/n, ..., 1/n]``. Without ``sigmas`` the pipeline runs a different grid,
  ``linspace(1, shift(1/1000), n)`` before the shift: its last step starts at sigma ~0.009
  rather than at shift(1/n).
- Prompt embeddings come from the pipeline's own ``encode_prompt``; the unconditional input
  is the empty prompt, as the pipeline's default negative prompt "". With ``drop_t5`` the T5
  part is zeros, as the pipeline does when ``text_encoder_3`` is None.
- Decoding is the pipeline's: ``vae.decode(latents / scaling_factor + shift_factor)``, mapped
  from [-1, 1] to [0, 1].
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.models.attention import JointTransformerBlock
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from cdmbench import flow
from cdmbench.backbones.base import Backbone, Cond, Prompt
from cdmbench.errors import UserError

HUB_ID = "stabilityai/stable-diffusion-3-medium-diffusers"
WEIGHTS_ENV = "CDMBENCH_SD3"  # a local diffusers directory or a hub id
SHIFT = 3.0  # SD3-Medium's scheduler config
SCHEDULE_FILE = "cdmbench_schedule.json"

TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3",
              "tokenizer", "tokenizer_2", "tokenizer_3")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
CLASSES: dict[str, Any] = {
    "transformer": SD3Transformer2DModel,
    "scheduler": FlowMatchEulerDiscreteScheduler,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModelWithProjection,
    "text_encoder_2": CLIPTextModelWithProjection,
    "text_encoder_3": T5EncoderModel,
    "tokenizer": CLIPTokenizer,
    "tokenizer_2": CLIPTokenizer,
    "tokenizer_3": T5TokenizerFast,
}


class MissingWeightsError(UserError, FileNotFoundError):
    """Weights that are not on this machine; the one-line message names what to fetch."""


# ------------------------------------------------------------------------------ weights
def _is_hub_id(spec: str) -> bool:
    """'owner/name' that is not an existing local path."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", spec)) and not Path(spec).exists()


def _fetch_hint(spec: str) -> str:
    repo = spec if _is_hub_id(spec) else HUB_ID
    return (f"fetch them with `hf download {repo}` (a gated repo: accept its licence on "
            f"huggingface.co and run `hf auth login` first), or pass a local diffusers "
            f"directory as weights (or set {WEIGHTS_ENV})")


def resolve_weights(spec: str, parts: Sequence[str]) -> Path:
    """The local diffusers directory that ``spec`` (a directory or a hub id) names.

    A hub id is looked up in the local cache first and downloaded only when not cached and
    the hub is not offline (HF_HUB_OFFLINE=1); any failure is one :class:`MissingWeightsError`.
    """
    if not _is_hub_id(spec):
        path = Path(spec).expanduser()
        if path.is_dir():
            return path
        raise MissingWeightsError(f"SD3 weights: no directory {path}; {_fetch_hint(spec)}")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", *(f"{p}/*" for p in parts)]
    ignore = ["*.bin", "*.ckpt", "*.msgpack", "*.onnx*", "*fp16*"]
    try:
        return Path(snapshot_download(spec, allow_patterns=patterns, ignore_patterns=ignore,
                                      local_files_only=True))
    except Exception:  # not cached: try the hub below
        pass
    try:
        return Path(snapshot_download(spec, allow_patterns=patterns, ignore_patterns=ignore))
    except Exception as e:  # offline, gated, no network: all one user error
        raise MissingWeightsError(f"SD3 weights '{spec}' are not in the local Hugging Face cache "
                                  f"and could not be downloaded ({type(e).__name__}); "
                                  f"{_fetch_hint(spec)}") from None


def _dtype_kwarg(cls: type) -> str:
    """transformers >= 5 takes ``dtype=``; diffusers and older transformers ``torch_dtype=``."""
    if cls.__module__.startswith("transformers"):
        import transformers

        return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return "torch_dtype"


def load_part(root: Path, name: str, dtype: torch.dtype) -> Any:
    """One pipeline component from a diffusers directory (a model in ``dtype``)."""
    cls = CLASSES[name]
    plain = name.startswith("tokenizer") or name == "scheduler"
    kwargs = {} if plain else {_dtype_kwarg(cls): dtype}
    try:
        return cls.from_pretrained(root, subfolder=name, **kwargs)
    except OSError as e:
        raise MissingWeightsError(f"SD3 component '{name}' is missing or unreadable under {root} "
                                  f"({type(e).__name__}); {_fetch_hint(str(root))}") from None


def load_transformer(spec: str | os.PathLike, dtype: torch.dtype) -> SD3Transformer2DModel:
    """The denoiser from a pipeline directory, a transformer directory or a hub id."""
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        try:
            return SD3Transformer2DModel.from_pretrained(path, torch_dtype=dtype)
        except OSError as e:
            raise MissingWeightsError(f"SD3 transformer under {path} is unreadable "
                                      f"({type(e).__name__}); {_fetch_hint(spec)}") from None
    return load_part(resolve_weights(spec, ["transformer"]), "transformer", dtype)


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _to(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """``module`` on ``device`` in ``dtype``, casting only when needed (diffusers warns on
    every dtype cast through ``.to``)."""
    module = module.to(device)
    return module if _param_dtype(module) == dtype else module.to(dtype)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP/FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ----------------------------------------------------------------------------- backbone
class SD3(Backbone):
    """Stable Diffusion 3 Medium (Esser et al. 2024, arXiv 2403.03206) through diffusers.

    ``weights``: a local diffusers directory or a hub id (default: $CDMBENCH_SD3, else
    ``stabilityai/stable-diffusion-3-medium-diffusers``); nothing is read before first use.
    ``dtype``: bfloat16 on GPU, float32 on CPU by default; the teacher and the text encoders
    run in it. ``train_dtype``: the student and its copies (fake score, EMA) are cast to it
    (float32 master weights by default; on GPU the forward then runs under bf16 autocast).
    ``drop_t5``: no T5-XXL (zeros in its place, as the pipeline does without
    ``text_encoder_3``). ``gradient_checkpointing``: on the student and its trainable copies.
    """

    def __init__(self, device: str = "cpu", weights: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None, train_dtype: torch.dtype | None = torch.float32,
                 resolution: int = 1024, drop_t5: bool = False,
                 gradient_checkpointing: bool = False, train_prompts: str = "general",
                 test_prompts: str = "general", max_sequence_length: int = 256,
                 teacher_steps: int = 28, teacher_cfg: float = 7.0, name: str = "sd3") -> None:
        on_gpu = str(device).startswith("cuda")
        dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
        if resolution % 16:
            raise UserError(f"SD3 resolution must be a multiple of 16 (VAE 8 x patch 2), "
                            f"got {resolution}")
        super().__init__(
            name=name,
            latent_shape=(16, resolution // 8, resolution // 8),
            shift=SHIFT,
            default_teacher_steps=teacher_steps,  # SD3-Medium's usual 28 steps
            default_teacher_cfg=teacher_cfg,  # the pipeline's default guidance_scale
            device=device,
            dtype=dtype,
            fsdp_wrap_classes=(JointTransformerBlock,),
        )
        self.weights = self.default_weights() if weights is None else os.fspath(weights)
        if self.weights is not None and not _is_hub_id(self.weights) \
                and not Path(self.weights).expanduser().is_dir():
            raise MissingWeightsError(f"SD3 weights: no directory {self.weights}; "
                                      f"{_fetch_hint(self.weights)}")
        self.train_dtype = train_dtype or dtype
        self.resolution = resolution
        self.drop_t5 = drop_t5
        self.gradient_checkpointing = gradient_checkpointing
        self.train_prompts = train_prompts
        self.test_prompts = test_prompts
        self.max_sequence_length = max_sequence_length
        self._root: Path | None = None
        self._parts: dict[str, Any] = {}
        self._text_pipe: StableDiffusion3Pipeline | None = None
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}  # prompt text -> (embeds, pooled)
        self._prompt_sets: dict[str, list[Prompt]] = {}

    # ------------------------------------------------------------------- components
    def default_weights(self) -> str | None:
        """$CDMBENCH_SD3, else the hub id."""
        return os.environ.get(WEIGHTS_ENV) or HUB_ID

    @property
    def parts(self) -> tuple[str, ...]:
        """The pipeline components this backbone uses (no T5 with ``drop_t5``)."""
        names = ("transformer", "scheduler", "vae", *TEXT_PARTS)
        return tuple(n for n in names if not (self.drop_t5 and n in T5_PARTS))

    @property
    def weights_dir(self) -> Path | None:
        """The local diffusers directory (resolved, downloaded if allowed) or None."""
        if self.weights is None:
            return None
        if self._root is None:
            self._root = resolve_weights(self.weights, self.parts)
        return self._root

    def _load(self, name: str) -> Any:
        """A component, on the CPU, as stored."""
        return load_part(self.weights_dir, name, self.dtype)

    def component(self, name: str) -> Any:
        """A frozen component (loaded once), on the backbone's device; not the transformer."""
        if name == "transformer":
            raise ValueError("the transformer is not shared: use load_teacher()")
        if self.drop_t5 and name in T5_PARTS:
            return None
        if name not in self._parts:
            part = self._load(name)
            if isinstance(part, nn.Module):
                part = _to(part, self.device, self.dtype).eval().requires_grad_(False)
                if name == "vae" and self.use_channels_last():
                    part = part.to(memory_format=torch.channels_last)
            self._parts[name] = part
        return self._parts[name]

    def transformer_config(self) -> dict[str, Any]:
        return dict(SD3Transformer2DModel.load_config(self.weights_dir, subfolder="transformer"))

    def _new_transformer(self) -> SD3Transformer2DModel:
        return self._load("transformer")

    def pipeline(self, transformer: nn.Module | None = None,
                 scheduler: FlowMatchEulerDiscreteScheduler | None = None,
                 vae: bool = True) -> StableDiffusion3Pipeline:
        """A ``StableDiffusion3Pipeline`` over this backbone's components."""
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler or self.component("scheduler"),
            vae=self.component("vae") if vae else None,
            **{n: self.component(n) for n in TEXT_PARTS},
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------------ models
    def load_teacher(self, weights: str | None = None) -> nn.Module:
        """A fresh frozen copy of the denoiser (each call a new module: ``load_run`` loads a
        student's state into it)."""
        if weights is None:
            model = self._new_transformer()
        else:
            model = load_transformer(weights, self.dtype)
        return _to(model, self.device, self.dtype).eval().requires_grad_(False)

    def make_student(self, teacher: nn.Module) -> nn.Module:
        student = _to(self.clone(teacher), self.device, self.train_dtype)
        if self.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return student.requires_grad_(True).train()

    # ------------------------------------------------------------------ conditioning
    def prompts(self, split: str = "train") -> list[Prompt]:
        """The training prompts (``train_prompts``) or the evaluation ones (``test_prompts``)."""
        from cdmbench.prompts_io import load_prompt_set

        name = self.train_prompts if split == "train" else self.test_prompts
        if name not in self._prompt_sets:
            self._prompt_sets[name] = load_prompt_set(name)[1]
        return self._prompt_sets[name]

    def _text_pipeline(self) -> StableDiffusion3Pipeline:
        """The pipeline without transformer and VAE, for ``encode_prompt``.

        Without T5 the pipeline reads the zeros' width from ``transformer.config``, so it then
        gets a weightless (meta-device) transformer of the real configuration.
        """
        if self._text_pipe is None:
            skeleton = None
            if self.drop_t5:
                with torch.device("meta"):
                    skeleton = SD3Transformer2DModel.from_config(self.transformer_config())
            self._text_pipe = self.pipeline(transformer=skeleton, vae=False)
        return self._text_pipe

    def _embed(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(prompt_embeds, pooled_prompt_embeds) stacked, each text encoded once and cached.

        Texts are encoded one at a time, so an embedding does not depend on which texts it
        was batched with; normal (not inference-mode) tensors, since training uses them.
        """
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            pipe = self._text_pipeline()
            with torch.inference_mode(False), torch.no_grad():
                for text in missing:
                    emb, _, pooled, _ = pipe.encode_prompt(
                        prompt=[text], prompt_2=None, prompt_3=None,
                        device=torch.device(self.device),
                        do_classifier_free_guidance=False,
                        max_sequence_length=self.max_sequence_length)
                    self._cache[text] = (emb[0], pooled[0])
        embs, pooled = zip(*(self._cache[t] for t in texts), strict=True)
        return torch.stack(embs), torch.stack(pooled)

    def encode(self, prompts: Sequence[Prompt]) -> Cond:
        """Cond {"prompt_embeds", "pooled_projections"}; the null row is the empty prompt."""
        emb, pooled = self._embed([p.text for p in prompts])
        null_emb, null_pooled = self._embed([""])
        return Cond({"prompt_embeds": emb, "pooled_projections": pooled},
                    {"prompt_embeds": null_emb, "pooled_projections": null_pooled})

    def generation_settings(self) -> dict:
        """The base settings plus where the text encoders come from and how they are run."""
        return {**super().generation_settings(), "weights": self.weights, "drop_t5": self.drop_t5,
                "max_sequence_length": self.max_sequence_length}

    def random_cond(self, n: int, generator: torch.Generator) -> Cond:
        """``n`` training prompts drawn uniformly with replacement."""
        prompts = self.prompts("train")
        idx = torch.randint(0, len(prompts), (n,), generator=generator).tolist()
        return self.encode([prompts[i] for i in idx])

    # ---------------------------------------------------------------------- network
    def forward(self, model: nn.Module, x: Tensor, s: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """v(x, s | cond), called as the pipeline calls the transformer (timestep 1000 s)."""
        dtype = _param_dtype(model)
        autocast = (x.device.type == "cuda" and dtype != self.dtype
                    and self.dtype in (torch.bfloat16, torch.float16))
        with torch.autocast("cuda", dtype=self.dtype) if autocast else contextlib.nullcontext():
            out = model(hidden_states=x.to(dtype), timestep=flow.timestep(s.float()),
                        encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                        pooled_projections=cond["pooled_projections"].to(dtype),
                        return_dict=False)[0]
        return out.float()

    # ----------------------------------------------------------------------- pixels
    @torch.no_grad()
    def export(self, student: nn.Module, out_dir, sigmas: list[float], stochastic: bool = False) -> Path:
        """A ``StableDiffusion3Pipeline`` directory holding the student (see :func:`export_student`)."""
        return export_student(self, student, out_dir, sigmas, stochastic=stochastic)

    @torch.no_grad()
    def decode(self, latents: Tensor, batch: int = 8) -> Tensor:
        """Latents -> images in [0, 1] as [B, 3, H, W] float, the pipeline's VAE path."""
        vae = self.component("vae")
        cfg = vae.config
        z = latents.to(self.device).float() / cfg.scaling_factor + cfg.shift_factor
        dtype = _param_dtype(vae)  # diffusers' `.dtype` walks every module: once, not per chunk
        out = [vae.decode(c.to(dtype), return_dict=False)[0].float() for c in z.split(batch)]
        return (torch.cat(out) / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: Tensor, batch: int = 8) -> Tensor:
        """Images in [0, 1] -> latents (posterior mode), the inverse of :meth:`decode`."""
        vae = self.component("vae")
        cfg = vae.config
        x = images.to(self.device).float() * 2 - 1
        z = [vae.encode(c.to(vae.dtype)).latent_dist.mode().float() for c in x.split(batch)]
        return (torch.cat(z) - cfg.shift_factor) * cfg.scaling_factor


# --------------------------------------------------------------------------- tiny-sd3
TINY_SEED = 0
TINY_RESOLUTION = 64  # latents 16 x 8 x 8
TINY_CLIP_MERGES = 2048  # CLIP's first BPE merges: a 2,562-token vocabulary that loads fast


def tiny_configs() -> dict[str, dict[str, Any]]:
    """Configs of tiny SD3 components: the real classes, at most ~100k parameters each."""
    from cdmbench.backbones.tiny_tokenizers import clip_vocab, t5_vocab

    n = len(clip_vocab(TINY_CLIP_MERGES)[0])  # bos, eos: the last two ids
    clip = dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    return {
        "transformer": dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                            attention_head_dim=8, num_attention_heads=4,
                            joint_attention_dim=64,  # T5 width; >= the two CLIP widths
                            caption_projection_dim=32, pooled_projection_dim=64,
                            out_channels=16, pos_embed_max_size=16),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=16,
                    down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4,
                    block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                    sample_size=TINY_RESOLUTION, scaling_factor=1.5305, shift_factor=0.0609,
                    use_quant_conv=False, use_post_quant_conv=False),  # SD3's VAE has neither
        "text_encoder": clip | {"hidden_act": "quick_gelu"},  # CLIP ViT-L/14's text tower
        "text_encoder_2": clip | {"hidden_act": "gelu"},  # OpenCLIP bigG's
        "text_encoder_3": dict(vocab_size=len(t5_vocab()), d_model=64, d_kv=16, d_ff=64,
                               num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                               relative_attention_max_distance=16, dropout_rate=0.0,
                               feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                               pad_token_id=0, eos_token_id=1),  # T5 v1.1 style
        "scheduler": dict(shift=SHIFT),
    }


@lru_cache(maxsize=2)
def tiny_parts(seed: int = TINY_SEED) -> dict[str, Any]:
    """Tiny SD3 components with seeded random weights, float32, CPU, eval mode.

    Built under a forked RNG: the global torch RNG is left as it was. Cached per process;
    callers get copies (:meth:`TinySD3._load`).
    """
    from cdmbench.backbones.tiny_tokenizers import clip_tokenizer, t5_tokenizer

    cfg = tiny_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts: dict[str, Any] = {
            "transformer": SD3Transformer2DModel(**cfg["transformer"]),
            "vae": AutoencoderKL(**cfg["vae"]),
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
            "text_encoder_3": T5EncoderModel(T5Config(**cfg["text_encoder_3"])),
        }
    for part in parts.values():
        part.eval().requires_grad_(False)  # eval: T5's dropout would make outputs random
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    parts["tokenizer"] = clip_tokenizer(merges=TINY_CLIP_MERGES)
    parts["tokenizer_2"] = clip_tokenizer(pad_token="!", merges=TINY_CLIP_MERGES)  # as SD3's
    parts["tokenizer_3"] = t5_tokenizer()
    return parts


class TinySD3(SD3):
    """SD3's classes from tiny configs with seeded random weights; fully offline.

    Latents [16, 8, 8], images 64 x 64; the same transformer every ``load_teacher()`` call.
    ``weights``: a directory (e.g. an exported tiny pipeline) to load instead.
    """

    def __init__(self, device: str = "cpu", weights: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None, seed: int = TINY_SEED,
                 drop_t5: bool = False, gradient_checkpointing: bool = False,
                 train_prompts: str = "general", test_prompts: str = "general",
                 max_sequence_length: int = 256, teacher_steps: int = 4,
                 teacher_cfg: float = 7.0) -> None:
        super().__init__(device=device, weights=weights, dtype=dtype, train_dtype=None,
                         resolution=TINY_RESOLUTION, drop_t5=drop_t5,
                         gradient_checkpointing=gradient_checkpointing,
                         train_prompts=train_prompts, test_prompts=test_prompts,
                         max_sequence_length=max_sequence_length, teacher_steps=teacher_steps,
                         teacher_cfg=teacher_cfg, name="tiny-sd3")
        self.seed = seed

    def default_weights(self) -> str | None:
        """None: random tiny weights, built in code."""
        return None

    def _load(self, name: str) -> Any:
        if self.weights is not None:
            return super()._load(name)
        part = tiny_parts(self.seed)[name]
        # a copy: the caller may move or cast it (tokenizers are not changed: shared)
        return part if name.startswith("tokenizer") else copy.deepcopy(part)

    def transformer_config(self) -> dict[str, Any]:
        if self.weights is not None:
            return super().transformer_config()
        return dict(tiny_parts(self.seed)["transformer"].config)

    def generation_settings(self) -> dict:
        """SD3's settings plus the seed of the random tiny text encoders."""
        return {**super().generation_settings(), "seed": self.seed}


# ------------------------------------------------------------------------------- export
def unshift(sigmas: Sequence[float], shift: float) -> list[float]:
    """Inverse of the time shift: s = s' / (k - (k - 1) s')."""
    t = torch.as_tensor(list(sigmas), dtype=torch.float64)
    return [float(v) for v in (t / (shift - (shift - 1) * t))]


def export_student(backbone: SD3, student: nn.Module, out_dir: str | os.PathLike,
                   sigmas: Sequence[float], *, stochastic: bool = False, guidance: float = 1.0,
                   copy_components: bool | None = None) -> Path:
    """Write ``student`` as a ``StableDiffusion3Pipeline`` directory (``save_pretrained`` layout).

    ``sigmas`` is the student's post-shift schedule ending in 0 (what the network sees). The
    scheduler config carries the shift, and ``stochastic_sampling`` for re-noising samplers
    (its step is cdmbench's: predict x0, re-noise to the next sigma). diffusers' default grid
    is not a fixed list, so the exact schedule goes to ``cdmbench_schedule.json``; its
    ``pipeline_sigmas`` are the pre-shift values to pass as ``sigmas=`` (the scheduler shifts
    them back). The other components are copied (``copy_components``, default for weights
    not on disk, e.g. tiny-sd3) or linked to the backbone's weights directory.
    """
    sig = [float(s) for s in sigmas]
    if len(sig) < 2 or sig[-1] != 0.0 or any(b >= a for a, b in zip(sig, sig[1:], strict=False)):
        raise ValueError(f"sigmas must be a descending list ending in 0, got {sig}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformer = _unwrap(student)
    if not isinstance(transformer, SD3Transformer2DModel):
        raise TypeError(f"expected an SD3Transformer2DModel, got {type(transformer).__name__}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        backbone.component("scheduler").config, shift=backbone.shift,
        stochastic_sampling=stochastic)
    root = backbone.weights_dir
    if copy_components if copy_components is not None else root is None:
        backbone.pipeline(transformer=transformer, scheduler=scheduler).save_pretrained(out)
    else:
        transformer.save_pretrained(out / "transformer")
        scheduler.save_pretrained(out / "scheduler")
        index = json.loads((root / "model_index.json").read_text())
        for name in ("vae", *TEXT_PARTS):
            if backbone.drop_t5 and name in T5_PARTS:
                index[name] = [None, None]
                continue
            link = out / name
            if not link.exists():
                link.symlink_to((root / name).resolve(), target_is_directory=True)
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = {
        "backbone": backbone.name,
        "shift": backbone.shift,
        "sigmas": sig,
        "pipeline_sigmas": unshift(sig[:-1], backbone.shift),
        "num_inference_steps": len(sig) - 1,
        "stochastic": stochastic,
        "guidance_scale": guidance,
        "usage": "StableDiffusion3Pipeline.from_pretrained(dir)(prompt, sigmas=pipeline_sigmas, "
                 "num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)",
    }
    (out / SCHEDULE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out
