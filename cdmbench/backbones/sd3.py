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

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

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
from cdmbench.backbones.diffusers_base import (
    DiffusersBackbone,
    DiffusersSettings,
    TinyTwin,
    param_dtype,
    unwrap,
)
from cdmbench.errors import UserError
from cdmbench.settings import setting

HUB_ID = "stabilityai/stable-diffusion-3-medium-diffusers"
WEIGHTS_ENV = "CDMBENCH_SD3"  # a local diffusers directory or a hub id
SHIFT = 3.0  # SD3-Medium's scheduler config
SCHEDULE_FILE = "cdmbench_schedule.json"

TEXT_PARTS = (
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
)
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


# ----------------------------------------------------------------------------- backbone
@dataclass(frozen=True)
class SD3Settings(DiffusersSettings):
    """SD3's settings: the shared diffusers ones (weights, dtypes, resolution, prompts) plus
    its text encoders'."""

    drop_t5: bool = False  # no T5-XXL: zeros in its place, as the pipeline without text_encoder_3
    max_sequence_length: int = setting(256, ge=1, le=512)  # T5 tokens, the pipeline's default
    teacher_steps: int = 28  # SD3-Medium's usual step count
    teacher_guidance: float = 7.0  # the pipeline's default guidance_scale

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolution % 16 or self.resolution < 16:
            raise UserError(
                f"SD3 resolution must be a multiple of 16 (VAE 8 x patch 2), got {self.resolution}"
            )


class SD3(DiffusersBackbone):
    """Stable Diffusion 3 Medium (Esser et al. 2024, arXiv 2403.03206) through diffusers.

    Settings (:class:`SD3Settings`): ``weights``, a local diffusers directory or a hub id
    (default: $CDMBENCH_SD3, else ``stabilityai/stable-diffusion-3-medium-diffusers``);
    nothing is read before first use. ``dtype``: the teacher and the text encoders run in
    it. ``train_dtype``: the student and its copies (fake score, EMA). ``drop_t5``: no
    T5-XXL. ``gradient_checkpointing``: on the student and its trainable copies.
    """

    name = "sd3"
    Settings: ClassVar[type[SD3Settings]] = SD3Settings
    label = "SD3"
    hub_id = HUB_ID
    weights_env = WEIGHTS_ENV
    classes = CLASSES
    shift = SHIFT
    fsdp_wrap_classes = (JointTransformerBlock,)

    def __init__(self, device: str = "cpu", settings: Any = None, **kwargs: Any) -> None:
        super().__init__(device, settings, **kwargs)
        side = self.settings.resolution // 8
        self.latent_shape = (16, side, side)
        self._text_pipe: StableDiffusion3Pipeline | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        """The pipeline components this backbone uses (no T5 with ``drop_t5``)."""
        return tuple(n for n in CLASSES if not (self.settings.drop_t5 and n in T5_PARTS))

    def pipeline(
        self,
        transformer: nn.Module | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        vae: bool = True,
    ) -> StableDiffusion3Pipeline:
        """A ``StableDiffusion3Pipeline`` over this backbone's components."""
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler or self.component("scheduler"),
            vae=self.component("vae") if vae else None,
            **{n: self.component(n) for n in TEXT_PARTS},
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------ conditioning
    def _text_pipeline(self) -> StableDiffusion3Pipeline:
        """The pipeline without transformer and VAE, for ``encode_prompt``.

        Without T5 the pipeline reads the zeros' width from ``transformer.config``, so it then
        gets a weightless (meta-device) transformer of the real configuration.
        """
        if self._text_pipe is None:
            skeleton = None
            if self.settings.drop_t5:
                with torch.device("meta"):
                    skeleton = SD3Transformer2DModel.from_config(self.transformer_config())
            self._text_pipe = self.pipeline(transformer=skeleton, vae=False)
        return self._text_pipe

    def _encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        """Cond {"prompt_embeds", "pooled_projections"} from the pipeline's ``encode_prompt``."""
        emb, _, pooled, _ = self._text_pipeline().encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=torch.device(self.device),
            do_classifier_free_guidance=False,
            max_sequence_length=self.settings.max_sequence_length,
        )
        return {"prompt_embeds": emb, "pooled_projections": pooled}

    def generation_settings(self) -> dict:
        """The shared settings plus how the text encoders are run."""
        return {
            **super().generation_settings(),
            "drop_t5": self.settings.drop_t5,
            "max_sequence_length": self.settings.max_sequence_length,
        }

    # ---------------------------------------------------------------------- network
    def forward(self, model: nn.Module, x: Tensor, s: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """v(x, s | cond), called as the pipeline calls the transformer (timestep 1000 s)."""
        dtype = param_dtype(model)
        with self.autocast(dtype, x.device):
            out = model(
                hidden_states=x.to(dtype),
                timestep=flow.timestep(s.float()),
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                pooled_projections=cond["pooled_projections"].to(dtype),
                return_dict=False,
            )[0]
        return out.float()

    # ----------------------------------------------------------------------- pixels
    @torch.no_grad()
    def export(
        self, student: nn.Module, out_dir, sigmas: list[float], stochastic: bool = False
    ) -> Path:
        """A ``StableDiffusion3Pipeline`` directory holding the student (see :func:`export_student`)."""
        return export_student(self, student, out_dir, sigmas, stochastic=stochastic)

    def export_adapter(self, adapter: dict[str, Tensor], out_dir) -> Path:
        """``pytorch_lora_weights.safetensors`` in ``out_dir``, as diffusers' SD3 LoRA trainer
        writes it: ``StableDiffusion3Pipeline.load_lora_weights(out_dir)`` reads it onto the
        teacher's pipeline (rank and alpha in its metadata)."""
        s = self.settings
        StableDiffusion3Pipeline.save_lora_weights(
            out_dir,
            transformer_lora_layers=adapter,
            transformer_lora_adapter_metadata={
                "r": s.lora_rank,
                "lora_alpha": s.lora_alpha or s.lora_rank,
                "target_modules": list(s.lora_targets),
            },
        )
        return Path(out_dir)

    @torch.no_grad()
    def decode(self, latents: Tensor, batch: int = 8) -> Tensor:
        """Latents -> images in [0, 1] as [B, 3, H, W] float, the pipeline's VAE path."""
        vae = self.component("vae")
        cfg = vae.config
        z = latents.to(self.device).float() / cfg.scaling_factor + cfg.shift_factor
        dtype = param_dtype(vae)  # diffusers' `.dtype` walks every module: once, not per chunk
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
    clip = dict(
        vocab_size=n,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=n - 2,
        eos_token_id=n - 1,
        pad_token_id=n - 1,
    )
    return {
        "transformer": dict(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,  # T5 width; >= the two CLIP widths
            caption_projection_dim=32,
            pooled_projection_dim=64,
            out_channels=16,
            pos_embed_max_size=16,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=TINY_RESOLUTION,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),  # SD3's VAE has neither
        "text_encoder": clip | {"hidden_act": "quick_gelu"},  # CLIP ViT-L/14's text tower
        "text_encoder_2": clip | {"hidden_act": "gelu"},  # OpenCLIP bigG's
        "text_encoder_3": dict(
            vocab_size=len(t5_vocab()),
            d_model=64,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            pad_token_id=0,
            eos_token_id=1,
        ),  # T5 v1.1 style
        "scheduler": dict(shift=SHIFT),
    }


@lru_cache(maxsize=1)
def _tiny_plain() -> dict[str, Any]:
    from cdmbench.backbones.tiny_tokenizers import clip_tokenizer, t5_tokenizer

    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**tiny_configs()["scheduler"]),
        "tokenizer": clip_tokenizer(merges=TINY_CLIP_MERGES),
        "tokenizer_2": clip_tokenizer(pad_token="!", merges=TINY_CLIP_MERGES),  # as SD3's
        "tokenizer_3": t5_tokenizer(),
    }


@dataclass(frozen=True)
class TinySD3Settings(SD3Settings):
    seed: int = 0  # of the random weights
    resolution: int = TINY_RESOLUTION  # up to 256: the tiny transformer's 16 x 16 patch grid
    train_dtype: str = "auto"
    teacher_steps: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolution > 256:
            raise UserError(
                f"tiny-sd3 resolution must be at most 256 (16 x 16 patches), got {self.resolution}"
            )


class TinySD3(TinyTwin, SD3):
    """SD3's classes from tiny configs with seeded random weights; fully offline.

    Latents [16, 8, 8] at the default 64 x 64 pixels; the same transformer every
    ``load_teacher()`` call. ``weights``: a directory (e.g. an exported tiny pipeline) to
    load instead.
    """

    name = "tiny-sd3"
    Settings: ClassVar[type[TinySD3Settings]] = TinySD3Settings

    @classmethod
    def tiny_configs(cls) -> dict[str, dict[str, Any]]:
        return tiny_configs()

    @classmethod
    def tiny_builders(cls) -> dict[str, Any]:
        cfg = tiny_configs()
        return {  # the construction order fixes the weights
            "transformer": lambda: SD3Transformer2DModel(**cfg["transformer"]),
            "vae": lambda: AutoencoderKL(**cfg["vae"]),
            "text_encoder": lambda: CLIPTextModelWithProjection(
                CLIPTextConfig(**cfg["text_encoder"])
            ),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(
                CLIPTextConfig(**cfg["text_encoder_2"])
            ),
            "text_encoder_3": lambda: T5EncoderModel(T5Config(**cfg["text_encoder_3"])),
        }

    @classmethod
    def tiny_plain(cls) -> dict[str, Any]:
        return _tiny_plain()

    def generation_settings(self) -> dict:
        """SD3's settings plus the seed of the random tiny text encoders."""
        return {**super().generation_settings(), "seed": self.settings.seed}


# ------------------------------------------------------------------------------- export
def export_student(
    backbone: SD3,
    student: nn.Module,
    out_dir: str | os.PathLike,
    sigmas: Sequence[float],
    *,
    stochastic: bool = False,
    guidance: float = 1.0,
    copy_components: bool | None = None,
) -> Path:
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
    transformer = unwrap(student)
    if not isinstance(transformer, SD3Transformer2DModel):
        raise TypeError(f"expected an SD3Transformer2DModel, got {type(transformer).__name__}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        backbone.component("scheduler").config, shift=backbone.shift, stochastic_sampling=stochastic
    )
    root = backbone.weights_dir
    if copy_components if copy_components is not None else root is None:
        backbone.pipeline(transformer=transformer, scheduler=scheduler).save_pretrained(out)
    else:
        transformer.save_pretrained(out / "transformer")
        scheduler.save_pretrained(out / "scheduler")
        index = json.loads((root / "model_index.json").read_text())
        for name in ("vae", *TEXT_PARTS):
            if backbone.settings.drop_t5 and name in T5_PARTS:
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
        "pipeline_sigmas": flow.unshift(sig[:-1], backbone.shift),
        "num_inference_steps": len(sig) - 1,
        "stochastic": stochastic,
        "guidance_scale": guidance,
        "usage": "StableDiffusion3Pipeline.from_pretrained(dir)(prompt, sigmas=pipeline_sigmas, "
        "num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)",
    }
    (out / SCHEDULE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out
