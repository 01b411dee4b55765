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
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    LongCatImagePipeline,
    LongCatImageTransformer2DModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.transformers.transformer_longcat_image import (
    LongCatImageSingleTransformerBlock,
    LongCatImageTransformerBlock,
)
from torch import Tensor, nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from cdmbench import flow
from cdmbench.backbones.base import Cond
from cdmbench.backbones.diffusers_base import (
    DiffusersBackbone,
    DiffusersSettings,
    TinyTwin,
    param_dtype,
    transformers_major,
)
from cdmbench.errors import UserError
from cdmbench.settings import setting

HUB_ID = "meituan-longcat/LongCat-Image"
ENV_VAR = "CDMBENCH_LONGCAT"
TEXT_TOKENS = 512  # LongCatImagePipeline.tokenizer_max_length: prompt length, image id offset
CLASSES: dict[str, Any] = {
    "scheduler": FlowMatchEulerDiscreteScheduler,
    "vae": AutoencoderKL,
    "text_encoder": Qwen2_5_VLForConditionalGeneration,
    "tokenizer": Qwen2Tokenizer,
    "transformer": LongCatImageTransformer2DModel,
}


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
    for key in (
        "shift_terminal",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "invert_sigmas",
        "stochastic_sampling",
    ):
        if cfg.get(key):
            raise ValueError(f"scheduler option {key}={cfg[key]!r} has no cdmbench equivalent")
    if not cfg.get("use_dynamic_shifting", False):
        return float(cfg.get("shift", 1.0))
    mu = calculate_shift(
        seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    kind = cfg.get("time_shift_type", "exponential")
    return float(math.exp(mu)) if kind == "exponential" else float(mu)


# ------------------------------------------------------------------------------ backbone
@dataclass(frozen=True)
class LongCatSettings(DiffusersSettings):
    """LongCat's settings: the shared diffusers ones plus its guidance variant."""

    resolution: int | tuple[int, int] = 1024  # pixels: a side, or (height, width)
    cfg_renorm: bool = False  # the pipeline's CFG renorm in velocity (off: plain CFG)
    # lower clamp of the renorm scale (the pipeline's)
    cfg_renorm_min: float = setting(0.0, ge=0, le=1)
    teacher_steps: int = 50  # LongCatImagePipeline.__call__(num_inference_steps=50)
    teacher_guidance: float = 4.5  # LongCatImagePipeline.__call__(guidance_scale=4.5)


class LongCat(DiffusersBackbone):
    """LongCat-Image (arXiv:2512.07584) through diffusers' ``LongCatImagePipeline``.

    Settings (:class:`LongCatSettings`): ``weights``, a diffusers pipeline directory or hub
    id (default ``$CDMBENCH_LONGCAT``, else ``meituan-longcat/LongCat-Image``); only configs
    are read at construction, the text encoder, VAE and transformer load on first use.
    ``resolution``: an int or (height, width), a multiple of 16. ``cfg_renorm``: the
    pipeline's CFG renorm in :meth:`velocity`. ``gradient_checkpointing``: on students
    made by :meth:`make_student`.
    """

    name = "longcat"
    Settings: ClassVar[type[LongCatSettings]] = LongCatSettings
    label = "LongCat-Image"
    hub_id = HUB_ID
    weights_env = ENV_VAR
    classes = CLASSES
    fsdp_wrap_classes = (LongCatImageTransformerBlock, LongCatImageSingleTransformerBlock)
    decode_batch = 4  # images per VAE decode call

    def __init__(self, device: str = "cpu", settings: Any = None, **kwargs: Any) -> None:
        super().__init__(device, settings, **kwargs)
        res = self.settings.resolution
        h, w = (res, res) if isinstance(res, int) else res
        self.scheduler_config = self.component_config("scheduler")
        self.vae_config = self.component_config("vae")
        f = 2 ** (len(self.vae_config["block_out_channels"]) - 1)  # the pipeline's vae_scale_factor
        if h % (2 * f) or w % (2 * f):
            raise UserError(
                f"LongCat resolution {h}x{w} must be a multiple of {2 * f} "
                "(VAE scale x 2x2 packing)"
            )
        self.height, self.width, self.vae_scale_factor = h, w, f
        self.latent_shape = (int(self.vae_config.get("latent_channels", 16)), h // f, w // f)
        self.shift = shift_for(self.scheduler_config, image_seq_len(h, w, f))
        self._pipe: LongCatImagePipeline | None = None
        self._ids: dict[tuple, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------------ pipeline
    @property
    def pipe(self) -> LongCatImagePipeline:
        """A ``LongCatImagePipeline`` of this backbone's text encoder, tokenizer, VAE and
        scheduler (no transformer): the pipeline's own prompt encoding, packing and decoding."""
        if self._pipe is None:
            self._pipe = self.pipeline(None)
        return self._pipe

    @property
    def text_encoder(self) -> nn.Module:
        return self.component("text_encoder")

    @property
    def tokenizer(self) -> Any:
        return self.component("tokenizer")

    @property
    def vae(self) -> nn.Module:
        return self.component("vae")

    def pipeline(self, transformer: nn.Module | None) -> LongCatImagePipeline:
        """A diffusers ``LongCatImagePipeline`` around ``transformer`` (teacher, student or
        None) sharing this backbone's components. It has no ``text_processor``: call it
        with ``enable_prompt_rewrite=False``."""
        pipe = LongCatImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_processor=None,
            transformer=transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -------------------------------------------------------------------- conditioning
    def _encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        """The pipeline's ``encode_prompt`` (template, quote splitting, 512-token padding)."""
        emb, _ = self.pipe.encode_prompt(prompt=list(texts))
        return {"prompt_embeds": emb}

    def generation_settings(self) -> dict:
        """The shared settings plus the guidance variant."""
        return {
            **super().generation_settings(),
            "cfg_renorm": self.settings.cfg_renorm,
            "cfg_renorm_min": self.settings.cfg_renorm_min,
        }

    # ------------------------------------------------------------------ network call
    def pack(self, x: Tensor) -> Tensor:
        """[B, C, h, w] latents -> [B, hw/4, 4C] tokens (the pipeline's ``_pack_latents``)."""
        b, c, h, w = x.shape
        return LongCatImagePipeline._pack_latents(x, b, c, h, w)

    def unpack(self, tokens: Tensor, h: int, w: int) -> Tensor:
        """Inverse of :meth:`pack` for latents of size h x w (``_unpack_latents``)."""
        f = self.vae_scale_factor
        return LongCatImagePipeline._unpack_latents(tokens, h * f, w * f, f)

    def position_ids(
        self, n_text: int, h: int, w: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """(text ids, image ids) as the pipeline builds them, cached per shape and device."""
        key = (n_text, h, w, str(device))
        if key not in self._ids:
            from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

            start = getattr(self._pipe, "tokenizer_max_length", TEXT_TOKENS)
            txt = prepare_pos_ids(modality_id=0, type="text", start=(0, 0), num_token=n_text)
            img = prepare_pos_ids(
                modality_id=1, type="image", start=(start, start), height=h // 2, width=w // 2
            )
            self._ids[key] = (txt.to(device), img.to(device))
        return self._ids[key]

    def forward(self, model: nn.Module, x: Tensor, s: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """v(x, s) in cdmbench's layout and sign, via the packed-token transformer call."""
        b, _, h, w = x.shape
        dtype = param_dtype(model)
        emb = cond["prompt_embeds"].to(x.device, dtype)
        txt_ids, img_ids = self.position_ids(emb.shape[1], h, w, x.device)
        s = torch.as_tensor(s, dtype=torch.float32, device=x.device).expand(b)
        t = flow.timestep(s).to(dtype) / 1000  # the pipeline's `timestep / 1000`
        with self.autocast(dtype, x.device):
            out = model(
                hidden_states=self.pack(x.to(dtype)),
                encoder_hidden_states=emb,
                timestep=t,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]
        return self.unpack(out.float(), h, w)

    def velocity(
        self, model: nn.Module, x: Tensor, s: Tensor, cond: Cond, guidance: float = 1.0
    ) -> Tensor:
        """Plain CFG (the base contract); with ``cfg_renorm`` and ``w > 1`` the pipeline's
        renorm: per packed token, ``v`` scaled by clamp(|v_c| / |v|, cfg_renorm_min, 1)."""
        if not self.settings.cfg_renorm or guidance <= 1.0:
            return super().velocity(model, x, s, cond, guidance)
        v_u, v_c = self.velocity_uc(model, x, s, cond)
        v = self.pack(flow.cfg(v_u, v_c, guidance))
        c_norm = torch.norm(self.pack(v_c), dim=-1, keepdim=True)
        v_norm = torch.norm(v, dim=-1, keepdim=True)
        scale = (c_norm / (v_norm + 1e-8)).clamp(self.settings.cfg_renorm_min, 1.0)
        return self.unpack(v * scale, x.shape[2], x.shape[3])

    # -------------------------------------------------------------------------- pixels
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [0, 1], [B, 3, H, W], by the pipeline's decode path:
        ``vae.decode(z / scaling_factor + shift_factor)`` then ``postprocess(.., "pt")``."""
        vae = self.vae  # not through self.pipe: decoding needs no text encoder
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)  # the pipeline's
        dtype = param_dtype(vae)  # diffusers' `.dtype` walks every module: once, not per chunk
        out = []
        for z in latents.split(self.decode_batch):
            z = z.to(self.device) / vae.config.scaling_factor + vae.config.shift_factor
            img = vae.decode(z.to(dtype), return_dict=False)[0]
            out.append(processor.postprocess(img, output_type="pt").float())
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


# ------------------------------------------------------------------------- tiny variant
TINY_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
TINY_TEXT_HIDDEN = 32

TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TINY_TEXT_HIDDEN,
    "pooled_projection_dim": TINY_TEXT_HIDDEN,
    "axes_dims_rope": [4, 6, 6],
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# Flux-style dynamic shifting: the values LongCatImagePipeline falls back to.
TINY_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    """A byte-level BPE ``Qwen2Tokenizer`` built in code: the 256 byte symbols (no merges)
    plus the Qwen chat/vision special tokens, so the pipeline's template tokenises as in
    Qwen2.5 (``<|im_start|>`` etc. are single tokens; pad is ``<|endoftext|>``). Shared:
    tokenizers are never changed."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for tok in TINY_SPECIALS:
        vocab[tok] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=list(TINY_SPECIALS[1:]))


def tiny_text_config() -> Any:
    """A 2-layer Qwen2.5-VL config (hidden 32, M-RoPE sections summing to head_dim / 2)."""
    from transformers import Qwen2_5_VLConfig

    n = len(TINY_SPECIALS) + 256
    ids = {t: 256 + i for i, t in enumerate(TINY_SPECIALS)}
    mrope = [2, 3, 3]
    rope = (
        {"rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e6}}
        if transformers_major() >= 5
        else {"rope_scaling": {"type": "mrope", "mrope_section": mrope}, "rope_theta": 1e6}
    )
    text = {
        "vocab_size": n + 1,
        "hidden_size": TINY_TEXT_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        **rope,
    }
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": TINY_TEXT_HIDDEN,
        "fullatt_block_indexes": [0],
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


@dataclass(frozen=True)
class TinyLongCatSettings(LongCatSettings):
    seed: int = 0  # of the random weights
    resolution: int | tuple[int, int] = 64  # latents [16, 8, 8]
    teacher_steps: int = 4


class TinyLongCat(TinyTwin, LongCat):
    """LongCat-Image's classes from small configs with seeded random weights (offline).

    A 1+1-block transformer (width 32), a 4-level AutoencoderKL with 16 latent channels, a
    2-layer Qwen2.5-VL (hidden 32, with a one-block vision tower because the class has one;
    the pipeline only uses its text path) and a byte-level BPE tokenizer built in code.
    """

    name = "tiny-longcat"
    Settings: ClassVar[type[TinyLongCatSettings]] = TinyLongCatSettings

    @classmethod
    def tiny_configs(cls) -> dict[str, dict[str, Any]]:
        return {"transformer": TINY_TRANSFORMER, "vae": TINY_VAE, "scheduler": TINY_SCHEDULER}

    @classmethod
    def tiny_builders(cls) -> dict[str, Any]:
        return {  # the construction order fixes the weights
            "text_encoder": lambda: Qwen2_5_VLForConditionalGeneration(tiny_text_config()),
            "vae": lambda: AutoencoderKL(**TINY_VAE),
            "transformer": lambda: LongCatImageTransformer2DModel(**TINY_TRANSFORMER),
        }

    @classmethod
    def tiny_plain(cls) -> dict[str, Any]:
        return {
            "tokenizer": tiny_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler.from_config(TINY_SCHEDULER),
        }

    def generation_settings(self) -> dict:
        """LongCat's settings plus the seed of the random tiny text encoder."""
        return {**super().generation_settings(), "seed": self.settings.seed}
