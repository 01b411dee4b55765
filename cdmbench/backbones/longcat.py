"""`longcat` and `tiny-longcat`: LongCat-Image through diffusers' ``LongCatImagePipeline``.

LongCat-Image (Meituan LongCat Team, "LongCat-Image Technical Report", arXiv:2512.07584) is a
6B rectified-flow MM-DiT (Flux-style double- and single-stream blocks, 3-axis RoPE) that reads
the last hidden layer of a Qwen2.5-VL-7B text encoder and denoises 16-channel latents of a
Flux-style VAE (scale 8). diffusers 0.42 ships it as ``LongCatImagePipeline`` with
``LongCatImageTransformer2DModel``, ``AutoencoderKL``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen2Tokenizer`` and ``FlowMatchEulerDiscreteScheduler``; hub id
``meituan-longcat/LongCat-Image``.

How the pipeline maps onto cdmbench's conventions (DESIGN section 2), read off
``pipeline_longcat_image.py`` and ``transformer_longcat_image.py`` in diffusers 0.42.1:

- Latents. The pipeline draws [B, 16, H/8, W/8] noise and packs 2x2 patches Flux-style into
  [B, (H/16)(W/16), 64] tokens (``_pack_latents``); a ``latents=`` argument is used as given,
  i.e. already packed. cdmbench keeps latents *unpacked*, ``latent_shape = (16, H/8, W/8)``,
  and packs/unpacks inside :meth:`LongCat.forward` with the pipeline's own static methods.
  Packing is a permutation, so the pipeline fed ``_pack_latents(noise)`` and cdmbench fed
  ``noise`` run bit-for-bit the same computation; the per-sample noise seeding and ``decode``
  stay in the VAE's layout.
- Velocity and timestep. ``scheduler.step`` is ``x + (sigma_next - sigma) * model_output``:
  the transformer predicts ``v = eps - x0`` with cdmbench's sign, so no conversion is needed.
  The pipeline passes ``timestep = (1000 sigma) / 1000`` and the transformer multiplies by
  1000 again before its sinusoidal embedding; :meth:`LongCat.forward` reproduces that
  arithmetic (``flow.timestep(s)`` cast to the model dtype, divided by 1000).
- Shift. The pipeline computes ``mu = calculate_shift(image_seq_len)`` (linear in the packed
  token count between ``base_image_seq_len``/``base_shift`` and ``max_image_seq_len``/
  ``max_shift``) and the scheduler applies the "exponential" time shift
  ``e^mu / (e^mu + (1/s - 1))``. Multiplying through by ``s``, that is
  ``k s / (1 + (k - 1) s)`` with ``k = e^mu``: cdmbench's :func:`cdmbench.flow.time_shift`.
  So ``shift = exp(mu)`` for the configured resolution (``mu`` itself for the "linear" type,
  ``config.shift`` without dynamic shifting); at 1024x1024 (4096 tokens) ``mu = max_shift``.
  The pipeline's default sigmas ``linspace(1, 1/n, n)`` plus the appended 0 are
  ``flow.uniform_schedule(n, shift)``.
- Text. ``encode`` calls the pipeline's ``encode_prompt``: the prompt (quoted spans tokenised
  character by character) is padded to 512 tokens, wrapped in the Qwen chat template, run
  through the text encoder, and the last hidden layer without the template tokens is the
  condition, [B, 512, 3584]. The transformer attends to all 512 positions (no mask), so every
  embedding has the same shape and CFG batches in one call. The unconditional input is the
  pipeline's negative prompt, the empty string. Text position ids (modality 0, positions
  0..511) and image ids (modality 1, starting at 512) are rebuilt in ``forward`` with the
  pipeline's ``prepare_pos_ids``.
- Guidance. ``v = v_u + w (v_c - v_u)`` when ``w > 1``, as in cdmbench. The pipeline then
  applies "CFG renorm" by default (per packed token, rescale ``v`` to at most the norm of
  ``v_c``, ``enable_cfg_renorm=True, cfg_renorm_min=0``); cdmbench uses plain CFG everywhere
  (methods combine ``velocity_uc`` themselves), so renorm is off unless ``cfg_renorm=True``.
- Not reproduced: the pipeline's default prompt rewriting (``enable_prompt_rewrite=True``,
  the Qwen2.5-VL LLM generates a longer prompt first). cdmbench encodes prompts as written,
  like ``enable_prompt_rewrite=False``, so samples are deterministic and comparable.
- Precision. bf16 on GPU, float32 on CPU. The pipeline keeps its latents in the model dtype
  between steps; cdmbench's sampler keeps them in float32 and casts at each network call.

Defaults: 50 steps at CFG 4.5 (the pipeline's ``num_inference_steps`` and
``guidance_scale``). There is no real data (``real_latents`` is None): methods that need clean
latents use teacher samples. Prompts come from the packaged ``general`` set.

``tiny-longcat`` builds the same classes from small configs with seeded random weights, fully
offline: a 1+1-block transformer (width 32), a 4-level AutoencoderKL with 16 latent channels,
a 2-layer Qwen2.5-VL (hidden 32, with a one-block vision tower because the class has one; the
pipeline only uses its text path) and a byte-level BPE ``Qwen2Tokenizer`` built in code with
the chat-template special tokens. Resolution 64 (latents [16, 8, 8]), 4 teacher steps.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cdmbench import flow
from cdmbench.backbones.base import Backbone, Cond, Prompt
from cdmbench.errors import UserError

HUB_ID = "meituan-longcat/LongCat-Image"
ENV_VAR = "CDMBENCH_LONGCAT"
COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
TEXT_TOKENS = 512  # LongCatImagePipeline.tokenizer_max_length: prompt length, image id offset
DEFAULT_STEPS = 50  # LongCatImagePipeline.__call__(num_inference_steps=50)
DEFAULT_CFG = 4.5  # LongCatImagePipeline.__call__(guidance_scale=4.5)
PROMPT_SET = "general"
FETCH_HINT = (f"fetch them with `hf download {HUB_ID} --local-dir DIR` and pass weights=DIR "
              f"(or set {ENV_VAR}=DIR)")


class LongCatWeightsError(UserError, FileNotFoundError):
    """LongCat-Image weights are missing; the one-line message says what to fetch."""


# --------------------------------------------------------------------------- conventions
def image_seq_len(height: int, width: int, vae_scale_factor: int) -> int:
    """Packed image tokens at a pixel resolution: (H / 2f) (W / 2f) for VAE scale f."""
    return (height // (2 * vae_scale_factor)) * (width // (2 * vae_scale_factor))


def shift_for(scheduler_config: Mapping[str, Any], seq_len: int) -> float:
    """cdmbench's constant time shift ``k`` equal to the scheduler's shift at ``seq_len``.

    With dynamic shifting the pipeline computes ``mu = calculate_shift(seq_len, ...)`` and the
    scheduler's exponential shift ``e^mu / (e^mu + 1/s - 1)`` equals ``k s / (1 + (k-1) s)``
    with ``k = e^mu`` (``k = mu`` for the linear type). Without it, ``k = config.shift``.
    """
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import calculate_shift

    cfg = dict(scheduler_config)
    for key in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                "use_beta_sigmas", "invert_sigmas", "stochastic_sampling"):
        if cfg.get(key):
            raise ValueError(f"scheduler option {key}={cfg[key]!r} has no cdmbench equivalent")
    if not cfg.get("use_dynamic_shifting", False):
        return float(cfg.get("shift", 1.0))
    mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256),
                         cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                         cfg.get("max_shift", 1.15))
    kind = cfg.get("time_shift_type", "exponential")
    return float(math.exp(mu)) if kind == "exponential" else float(mu)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPU, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _hub_id(spec: str) -> bool:
    """``owner/name`` as on the Hugging Face hub (a path that does not exist is not one)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) is not None


def resolve_weights(weights: str | os.PathLike | None = None) -> str:
    """The weights source: ``weights``, else ``$CDMBENCH_LONGCAT``, else the hub id.

    A local directory must be a diffusers pipeline folder (``model_index.json`` and the
    component subfolders); a hub id must be reachable, or cached when ``HF_HUB_OFFLINE=1``.
    Anything else raises :class:`LongCatWeightsError` at once, in one line.
    """
    spec = os.fspath(weights) if weights is not None else os.environ.get(ENV_VAR) or HUB_ID
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LongCatWeightsError(f"LongCat-Image weights at {path} are a file, not a "
                                      f"diffusers pipeline directory; {FETCH_HINT}")
        missing = [c + "/" for c in COMPONENTS if not (path / c).is_dir()]
        if not (path / "model_index.json").is_file():
            missing.insert(0, "model_index.json")
        if missing:
            raise LongCatWeightsError(f"LongCat-Image weights in {path} lack {', '.join(missing)}; "
                                      f"{FETCH_HINT}")
        return str(path)
    if not _hub_id(spec):
        raise LongCatWeightsError(f"LongCat-Image weights not found: {spec} does not exist; "
                                  f"{FETCH_HINT}")
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(spec, "model_index.json")
    except Exception as e:  # offline and not cached, unknown repo, no network
        raise LongCatWeightsError(f"LongCat-Image weights '{spec}' are not available "
                                  f"({type(e).__name__}); {FETCH_HINT}") from None
    return spec


# ------------------------------------------------------------------------------ backbone
class LongCat(Backbone):
    """LongCat-Image (arXiv:2512.07584) through diffusers' ``LongCatImagePipeline``.

    Args:
        device: where models and conditions live.
        weights: a diffusers pipeline directory or hub id (default ``$CDMBENCH_LONGCAT``,
            else ``meituan-longcat/LongCat-Image``). Only configs are read here; the text
            encoder, VAE and transformer load on first use.
        resolution: image size in pixels, an int or (height, width), multiple of 16.
        dtype: dtype of the teacher, text encoder and VAE (default bf16 on GPU, float32 on
            CPU).
        train_dtype: the student and its copies (fake score, EMA) are cast to it: float32
            master weights by default; on GPU their forward then runs under bf16 autocast.
        cfg_renorm: apply the pipeline's CFG renorm in :meth:`velocity` (off: plain CFG).
        cfg_renorm_min: lower clamp of the renorm scale (the pipeline's ``cfg_renorm_min``).
        gradient_checkpointing: enable it on students made by :meth:`make_student`.
    """

    encode_batch = 8  # prompts per text-encoder call
    decode_batch = 4  # images per VAE decode call
    cache_size = 4096  # prompt embeddings kept (LRU, on CPU)

    def __init__(self, device: str = "cpu", weights: str | os.PathLike | None = None,
                 resolution: int | tuple[int, int] = 1024, dtype: torch.dtype | None = None,
                 train_dtype: torch.dtype | None = torch.float32, cfg_renorm: bool = False,
                 cfg_renorm_min: float = 0.0, gradient_checkpointing: bool = False) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        self.source = resolve_weights(weights)
        sched = self._config(FlowMatchEulerDiscreteScheduler, "scheduler")
        vae = self._config(AutoencoderKL, "vae")
        self._setup("longcat", device, dtype, train_dtype, resolution, sched, vae, DEFAULT_STEPS,
                    DEFAULT_CFG, cfg_renorm, cfg_renorm_min, gradient_checkpointing)

    # ------------------------------------------------------------------------ set-up
    def _setup(self, name: str, device: str, dtype: torch.dtype | None,
               train_dtype: torch.dtype | None, resolution: int | tuple[int, int],
               scheduler_config: Mapping[str, Any], vae_config: Mapping[str, Any],
               steps: int, cfg: float, cfg_renorm: bool,
               cfg_renorm_min: float, gradient_checkpointing: bool) -> None:
        from diffusers.models.transformers.transformer_longcat_image import (
            LongCatImageSingleTransformerBlock,
            LongCatImageTransformerBlock,
        )

        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        f = 2 ** (len(vae_config["block_out_channels"]) - 1)  # the pipeline's vae_scale_factor
        if h % (2 * f) or w % (2 * f):
            raise UserError(f"LongCat resolution {h}x{w} must be a multiple of {2 * f} "
                            "(VAE scale x 2x2 packing)")
        self.height, self.width, self.vae_scale_factor = h, w, f
        self.scheduler_config = dict(scheduler_config)
        self.vae_config = dict(vae_config)
        self.cfg_renorm, self.cfg_renorm_min = cfg_renorm, cfg_renorm_min
        self.gradient_checkpointing = gradient_checkpointing
        super().__init__(
            name=name,
            latent_shape=(int(vae_config.get("latent_channels", 16)), h // f, w // f),
            shift=shift_for(scheduler_config, image_seq_len(h, w, f)),
            default_teacher_steps=steps,
            default_teacher_cfg=cfg,
            device=str(device),
            dtype=dtype or default_dtype(device),
            fsdp_wrap_classes=(LongCatImageTransformerBlock, LongCatImageSingleTransformerBlock),
        )
        self.train_dtype = train_dtype or self.dtype
        self._pipe = None
        self._embeds: OrderedDict[str, Tensor] = OrderedDict()
        self._null: Tensor | None = None
        self._ids: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._prompt_list: list[Prompt] | None = None

    def _config(self, cls: type, subfolder: str) -> dict[str, Any]:
        try:
            return dict(cls.load_config(self.source, subfolder=subfolder))
        except Exception as e:
            raise LongCatWeightsError(f"LongCat-Image {subfolder} config not found in "
                                      f"{self.source} ({type(e).__name__}); {FETCH_HINT}") from None

    def _pretrained(self, cls: type, subfolder: str, source: str | None = None, **kw: Any) -> Any:
        src = source or self.source
        try:
            return cls.from_pretrained(src, subfolder=subfolder, **kw)
        except Exception as e:
            raise LongCatWeightsError(f"LongCat-Image {subfolder} could not be loaded from {src} "
                                      f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                                      f"{FETCH_HINT}") from None

    # ---------------------------------------------------------------- components (hooks)
    def _build_transformer(self, weights: str | os.PathLike | None) -> nn.Module:
        from diffusers import LongCatImageTransformer2DModel

        if weights is None:
            return self._pretrained(LongCatImageTransformer2DModel, "transformer",
                                    torch_dtype=self.dtype)
        path = Path(weights).expanduser()
        if path.is_file():  # a state dict for this architecture (a saved student)
            cfg = self._config(LongCatImageTransformer2DModel, "transformer")
            model = LongCatImageTransformer2DModel.from_config(cfg)
            return _load_state_file(model, path)
        if (path / "model_index.json").is_file():
            return self._pretrained(LongCatImageTransformer2DModel, "transformer", str(path),
                                    torch_dtype=self.dtype)
        if (path / "config.json").is_file():
            return self._pretrained(LongCatImageTransformer2DModel, None, str(path),
                                    torch_dtype=self.dtype)
        raise LongCatWeightsError(f"LongCat-Image transformer weights not found at {path}; "
                                  f"{FETCH_HINT}")

    def _build_text_encoder(self) -> nn.Module:
        import transformers
        from transformers import Qwen2_5_VLForConditionalGeneration

        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        return self._pretrained(Qwen2_5_VLForConditionalGeneration, "text_encoder",
                                **{key: self.dtype})

    def _build_tokenizer(self) -> Any:
        from transformers import Qwen2Tokenizer

        return self._pretrained(Qwen2Tokenizer, "tokenizer")

    def _build_vae(self) -> nn.Module:
        from diffusers import AutoencoderKL

        return self._pretrained(AutoencoderKL, "vae", torch_dtype=self.dtype)

    def _place(self, model: nn.Module) -> nn.Module:
        """Move to the backbone's dtype (only where needed: diffusers warns on every cast)
        and device, in eval mode."""
        if any(p.dtype != self.dtype for p in model.parameters() if p.is_floating_point()):
            model = model.to(self.dtype)
        return model.to(self.device).eval()

    # ------------------------------------------------------------------------ pipeline
    @property
    def pipe(self) -> Any:
        """A ``LongCatImagePipeline`` of this backbone's text encoder, tokenizer, VAE and
        scheduler (no transformer): the pipeline's own prompt encoding, packing and decoding."""
        if self._pipe is None:
            from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline

            te = self._place(self._build_text_encoder()).requires_grad_(False)
            vae = self._place(self._build_vae()).requires_grad_(False)
            if self.use_channels_last():
                vae = vae.to(memory_format=torch.channels_last)
            self._pipe = LongCatImagePipeline(
                scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
                vae=vae, text_encoder=te, tokenizer=self._build_tokenizer(),
                text_processor=None, transformer=None)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    @property
    def text_encoder(self) -> nn.Module:
        return self.pipe.text_encoder

    @property
    def tokenizer(self) -> Any:
        return self.pipe.tokenizer

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    def pipeline(self, transformer: nn.Module) -> Any:
        """A full diffusers ``LongCatImagePipeline`` around ``transformer`` (teacher or
        student) sharing this backbone's components. It has no ``text_processor``: call it
        with ``enable_prompt_rewrite=False``."""
        from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline

        p = self.pipe
        pipe = LongCatImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, text_processor=None,
            transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -------------------------------------------------------------------------- models
    def load_teacher(self, weights: str | os.PathLike | None = None) -> nn.Module:
        """The frozen transformer: from the backbone's weights, or ``weights`` (a pipeline or
        transformer directory, or a safetensors state dict of the same architecture)."""
        return self._place(self._build_transformer(weights)).requires_grad_(False)

    def make_student(self, teacher: nn.Module) -> nn.Module:
        """A trainable copy of the teacher in ``train_dtype``."""
        student = self.clone(teacher)
        if _param_dtype(student) != self.train_dtype:
            student = student.to(self.train_dtype)
        if self.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return student.requires_grad_(True).train()

    # -------------------------------------------------------------------- conditioning
    def prompts(self, split: str = "train") -> list[Prompt]:
        """The packaged ``general`` prompt set (the same prompts for every split: distillation
        here is data-free, so there is nothing to hold out)."""
        if split not in ("train", "test", "all"):
            raise ValueError(f"unknown split '{split}' (train, test, all)")
        if self._prompt_list is None:
            from cdmbench.prompts_io import load_prompt_set

            self._prompt_list = load_prompt_set(PROMPT_SET)[1]
        return list(self._prompt_list)

    def _run_text_encoder(self, texts: list[str]) -> Tensor:
        """The pipeline's ``encode_prompt`` (template, quote splitting, 512-token padding).

        Runs outside inference mode so cached embeddings can feed training graphs later.
        """
        with torch.inference_mode(False), torch.no_grad():
            emb, _ = self.pipe.encode_prompt(prompt=list(texts))
        return emb

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Prompt embeddings [n, 512, D] on the device, cached per prompt text."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._embeds))
        for i in range(0, len(todo), self.encode_batch):
            chunk = todo[i : i + self.encode_batch]
            for t, e in zip(chunk, self._run_text_encoder(chunk), strict=True):
                self._embeds[t] = e.to("cpu")
        out = []
        for t in texts:
            self._embeds.move_to_end(t)
            out.append(self._embeds[t])
        while len(self._embeds) > max(self.cache_size, len(texts)):
            self._embeds.popitem(last=False)
        return torch.stack(out).to(self.device, self.dtype)

    def null_embedding(self) -> Tensor:
        """The unconditional input: the pipeline's negative prompt "" , [1, 512, D]."""
        if self._null is None:
            self._null = self._run_text_encoder([""]).to(self.device, self.dtype)
        return self._null

    def encode(self, prompts: Sequence[Prompt]) -> Cond:
        emb = self.encode_texts([p.text for p in prompts])
        return Cond({"prompt_embeds": emb}, {"prompt_embeds": self.null_embedding()})

    def generation_settings(self) -> dict:
        """The base settings plus the weights' source (the text encoder comes from it) and the
        guidance variant."""
        return {**super().generation_settings(), "weights": str(self.source),
                "cfg_renorm": self.cfg_renorm, "cfg_renorm_min": self.cfg_renorm_min}

    def random_cond(self, n: int, generator: torch.Generator) -> Cond:
        """``n`` prompts drawn uniformly (with replacement) from the ``general`` set."""
        pool = self.prompts("train")
        idx = torch.randint(0, len(pool), (n,), generator=generator).tolist()
        return self.encode([pool[i] for i in idx])

    # ------------------------------------------------------------------ network call
    def pack(self, x: Tensor) -> Tensor:
        """[B, C, h, w] latents -> [B, hw/4, 4C] tokens (the pipeline's ``_pack_latents``)."""
        from diffusers import LongCatImagePipeline

        b, c, h, w = x.shape
        return LongCatImagePipeline._pack_latents(x, b, c, h, w)

    def unpack(self, tokens: Tensor, h: int, w: int) -> Tensor:
        """Inverse of :meth:`pack` for latents of size h x w (``_unpack_latents``)."""
        from diffusers import LongCatImagePipeline

        f = self.vae_scale_factor
        return LongCatImagePipeline._unpack_latents(tokens, h * f, w * f, f)

    def position_ids(self, n_text: int, h: int, w: int,
                     device: torch.device) -> tuple[Tensor, Tensor]:
        """(text ids, image ids) as the pipeline builds them, cached per shape and device."""
        key = (n_text, h, w, str(device))
        if key not in self._ids:
            from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

            start = getattr(self._pipe, "tokenizer_max_length", TEXT_TOKENS)
            txt = prepare_pos_ids(modality_id=0, type="text", start=(0, 0), num_token=n_text)
            img = prepare_pos_ids(modality_id=1, type="image", start=(start, start),
                                  height=h // 2, width=w // 2)
            self._ids[key] = (txt.to(device), img.to(device))
        return self._ids[key]

    def forward(self, model: nn.Module, x: Tensor, s: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """v(x, s) in cdmbench's layout and sign, via the packed-token transformer call."""
        b, _, h, w = x.shape
        dtype = _param_dtype(model)
        emb = cond["prompt_embeds"].to(x.device, dtype)
        txt_ids, img_ids = self.position_ids(emb.shape[1], h, w, x.device)
        s = torch.as_tensor(s, dtype=torch.float32, device=x.device).expand(b)
        t = flow.timestep(s).to(dtype) / 1000  # the pipeline's `timestep / 1000`
        autocast = x.device.type == "cuda" and dtype != self.dtype and self.dtype in (
            torch.bfloat16, torch.float16)
        with torch.autocast("cuda", dtype=self.dtype, enabled=autocast):
            out = model(hidden_states=self.pack(x.to(dtype)), encoder_hidden_states=emb,
                        timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        return self.unpack(out.float(), h, w)

    def velocity(self, model: nn.Module, x: Tensor, s: Tensor, cond: Cond,
                 guidance: float = 1.0) -> Tensor:
        """Plain CFG (the base contract); with ``cfg_renorm`` and ``w > 1`` the pipeline's
        renorm: per packed token, ``v`` scaled by clamp(|v_c| / |v|, cfg_renorm_min, 1)."""
        if not self.cfg_renorm or guidance <= 1.0:
            return super().velocity(model, x, s, cond, guidance)
        v_u, v_c = self.velocity_uc(model, x, s, cond)
        v = self.pack(flow.cfg(v_u, v_c, guidance))
        c_norm = torch.norm(self.pack(v_c), dim=-1, keepdim=True)
        v_norm = torch.norm(v, dim=-1, keepdim=True)
        scale = (c_norm / (v_norm + 1e-8)).clamp(self.cfg_renorm_min, 1.0)
        return self.unpack(v * scale, x.shape[2], x.shape[3])

    # -------------------------------------------------------------------------- pixels
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [0, 1], [B, 3, H, W], by the pipeline's decode path:
        ``vae.decode(z / scaling_factor + shift_factor)`` then ``postprocess(.., "pt")``."""
        pipe = self.pipe
        vae = pipe.vae
        dtype = next(vae.parameters()).dtype  # diffusers' `.dtype` walks every module: once, not per chunk
        out = []
        for z in latents.split(self.decode_batch):
            z = z.to(self.device) / vae.config.scaling_factor + vae.config.shift_factor
            img = vae.decode(z.to(dtype), return_dict=False)[0]
            out.append(pipe.image_processor.postprocess(img, output_type="pt").float())
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [0, 1], [B, 3, H, W] -> latents (the VAE posterior mode, normalised as the
        pipeline's inverse: ``(z - shift_factor) * scaling_factor``)."""
        vae = self.vae
        out = []
        for x in images.split(self.decode_batch):
            x = x.to(self.device, vae.dtype) * 2 - 1
            z = vae.encode(x).latent_dist.mode()
            out.append((z.float() - vae.config.shift_factor) * vae.config.scaling_factor)
        return torch.cat(out)

    def real_latents(self, split: str = "train") -> None:
        return None


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _load_state_file(model: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as e:
        raise LongCatWeightsError(f"cannot read transformer weights {path} ({type(e).__name__}); "
                                  "pass a safetensors state dict of the backbone's transformer"
                                  ) from None
    model.load_state_dict(state)
    return model


# ------------------------------------------------------------------------- tiny variant
TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TINY_TEXT_HIDDEN = 32

TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1,
    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": TINY_TEXT_HIDDEN,
    "pooled_projection_dim": TINY_TEXT_HIDDEN, "axes_dims_rope": [4, 6, 6],
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
    "sample_size": 64, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False,
}
# Flux-style dynamic shifting: the values LongCatImagePipeline falls back to.
TINY_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}


def tiny_tokenizer() -> Any:
    """A byte-level BPE ``Qwen2Tokenizer`` built in code: the 256 byte symbols (no merges)
    plus the Qwen chat/vision special tokens, so the pipeline's template tokenises as in
    Qwen2.5 (``<|im_start|>`` etc. are single tokens; pad is ``<|endoftext|>``)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for tok in TINY_SPECIALS:
        vocab[tok] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=list(TINY_SPECIALS[1:]))


def tiny_text_config() -> Any:
    """A 2-layer Qwen2.5-VL config (hidden 32, M-RoPE sections summing to head_dim / 2)."""
    import transformers
    from transformers import Qwen2_5_VLConfig

    n = len(TINY_SPECIALS) + 256
    ids = {t: 256 + i for i, t in enumerate(TINY_SPECIALS)}
    mrope = [2, 3, 3]
    rope = ({"rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e6}}
            if int(transformers.__version__.split(".")[0]) >= 5
            else {"rope_scaling": {"type": "mrope", "mrope_section": mrope}, "rope_theta": 1e6})
    text = {"vocab_size": n + 1, "hidden_size": TINY_TEXT_HIDDEN, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 1024, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], **rope}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
              "out_hidden_size": TINY_TEXT_HIDDEN, "fullatt_block_indexes": [0]}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"])


def _tiny_modules() -> dict[str, nn.Module]:
    from diffusers import AutoencoderKL, LongCatImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    return {
        "text_encoder": Qwen2_5_VLForConditionalGeneration(tiny_text_config()).eval(),
        "vae": AutoencoderKL(**TINY_VAE).eval(),
        "transformer": LongCatImageTransformer2DModel(**TINY_TRANSFORMER).eval(),
    }


def build_tiny_states(seed: int) -> dict[str, dict[str, Tensor]]:
    """Random weights of the tiny components from ``seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mods = _tiny_modules()
    return {k: {n: v.detach().clone() for n, v in m.state_dict().items()} for k, m in mods.items()}


@lru_cache(maxsize=4)
def tiny_states(seed: int) -> dict[str, dict[str, Tensor]]:
    """:func:`build_tiny_states`, once per process and seed."""
    return build_tiny_states(seed)


class TinyLongCat(LongCat):
    """LongCat-Image's classes from small configs with seeded random weights (offline)."""

    def __init__(self, device: str = "cpu", seed: int = 0, resolution: int | tuple[int, int] = 64,
                 dtype: torch.dtype | None = None, train_dtype: torch.dtype | None = torch.float32,
                 cfg_renorm: bool = False, cfg_renorm_min: float = 0.0) -> None:
        self.source = "tiny"
        self.seed = seed
        self._setup("tiny-longcat", device, dtype, train_dtype, resolution, TINY_SCHEDULER,
                    TINY_VAE, 4, DEFAULT_CFG, cfg_renorm, cfg_renorm_min, False)

    def _tiny(self, name: str) -> nn.Module:
        from diffusers import AutoencoderKL, LongCatImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration

        with torch.random.fork_rng(devices=[]):  # construction draws; the states overwrite them
            if name == "transformer":
                m = LongCatImageTransformer2DModel(**TINY_TRANSFORMER)
            elif name == "vae":
                m = AutoencoderKL(**TINY_VAE)
            else:
                m = Qwen2_5_VLForConditionalGeneration(tiny_text_config())
        m.load_state_dict(tiny_states(self.seed)[name])
        return m.eval()

    def _build_transformer(self, weights: str | os.PathLike | None) -> nn.Module:
        if weights is None:
            return self._tiny("transformer")
        from diffusers import LongCatImageTransformer2DModel

        path = Path(weights).expanduser()
        if path.is_file():
            with torch.random.fork_rng(devices=[]):
                model = LongCatImageTransformer2DModel(**TINY_TRANSFORMER).eval()
            return _load_state_file(model, path)
        if (path / "config.json").is_file():
            return LongCatImageTransformer2DModel.from_pretrained(str(path)).eval()
        raise LongCatWeightsError(f"tiny-longcat transformer weights not found at {path}; pass "
                                  "a safetensors state dict or a transformer directory, or none")

    def _build_text_encoder(self) -> nn.Module:
        return self._tiny("text_encoder")

    def _build_tokenizer(self) -> Any:
        return tiny_tokenizer()

    def _build_vae(self) -> nn.Module:
        return self._tiny("vae")

    def generation_settings(self) -> dict:
        """LongCat's settings plus the seed of the random tiny text encoder."""
        return {**super().generation_settings(), "seed": self.seed}
