"""Run the `image-reward` package's ImageReward-v1.0 model (Xu et al. 2023) on current libraries.

image-reward 1.5 pins ``timm==0.6.13`` and was written for transformers 4.x, so cdmbench installs
it with ``pip install --no-deps image-reward==1.5`` and this module bridges the gaps. What
breaks, and what is done about it:

- ``ImageReward/__init__.py`` and ``ImageReward/models/__init__.py`` import the ReFL trainer
  (``datasets``, ``diffusers`` training code) and the CLIP/Aesthetic baselines (OpenAI's ``clip``
  package). Scoring needs none of them, so the four modules that define the reward model
  (``ImageReward.py``, ``models/BLIP/{med,vit,blip,blip_pretrain}.py``) are imported from the
  package's files under a private alias package, without running those ``__init__`` files and
  without touching the name ``ImageReward`` in ``sys.modules``.
- ``models/BLIP/med.py`` imports ``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices``
  and ``prune_linear_layer`` from ``transformers.modeling_utils``; transformers 5 moved the
  first and last to ``transformers.pytorch_utils`` and removed the second. They are provided on
  ``transformers.modeling_utils`` for the duration of the import only.
- med.py's ``BertModel`` calls ``PreTrainedModel.get_head_mask`` and ``invert_attention_mask``,
  removed in transformers 5; the transformers 4 versions are added to the alias copy's class.
- ``models/BLIP/vit.py`` imports ``fairscale`` for gradient checkpointing only (training); when
  fairscale is absent a stand-in that refuses checkpointing is visible during the import only.
- timm 1.x still serves the old ``timm.models.{layers,helpers,registry,hub}`` paths (with
  FutureWarnings) and its ``PatchEmbed`` keeps the 0.6 parameter names, so vit.py works as is.
- ``blip.py`` calls ``warnings.filterwarnings("ignore")`` and ``blip_pretrain.py`` sets
  transformers' logging to errors only, both process-wide; both are undone after the import.
- ``blip.init_tokenizer`` downloads ``bert-base-uncased`` and uses
  ``tokenizer.additional_special_tokens_ids``, gone in transformers 5; :func:`blip_tokenizer`
  does the same from a local directory. ``ImageReward.__init__`` hard-codes that download and a
  ViT-L, so :func:`build_imagereward` assembles the package's own classes the same way, with
  the sizes as arguments (tests use a tiny model; the metric uses the package's sizes).
- med.py's ``BertModel.__init__`` calls ``init_weights``, whose transformers 5 version ends in
  ``tie_weights`` and needs attributes only ``post_init`` sets; the transformers 4 behaviour
  (``apply(_init_weights)``; BertModel ties nothing) is used instead.

The scoring methods (``ImageReward.score``, ``inference_rank``) are the package's, unchanged.
transformers 5 logs once that med.py's ``past_key_values`` output field is deprecated; harmless.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cdmbench.errors import UserError
from cdmbench.io import load_torch_file
from cdmbench.metrics.clip_score import uint8_to_pil

ALIAS = "_cdmbench_imagereward"  # private package name the ImageReward files are imported under
# ImageReward-v1.0's reward normalisation, as set in ImageReward.ImageReward.__init__
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
IMAGE_SIZE = (
    224  # ImageReward.__init__: BLIP_Pretrain(image_size=224, vit='large'), _transform(224)
)
MAX_TEXT_LEN = 35  # ImageReward.score: tokenizer(..., max_length=35)
PROJ_DIM = 256  # BLIP_Pretrain's embed_dim default

_modules: types.SimpleNamespace | None = None


def find_pruneable_heads_and_indices(
    heads: list[int], n_heads: int, head_size: int, already_pruned_heads: set[int]
) -> tuple[set[int], torch.LongTensor]:
    """transformers 4.x ``find_pruneable_heads_and_indices`` (removed in transformers 5)."""
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        head = head - sum(1 if h < head else 0 for h in already_pruned_heads)
        mask[head] = 0
    mask = mask.view(-1).contiguous().eq(1)
    index: torch.LongTensor = torch.arange(len(mask))[mask].long()
    return heads, index


def _get_head_mask(
    self: Any, head_mask: Tensor | None, num_hidden_layers: int, is_attention_chunked: bool = False
) -> Tensor | list[None]:
    """transformers 4.x ``ModuleUtilsMixin.get_head_mask``."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    if is_attention_chunked:
        head_mask = head_mask.unsqueeze(-1)
    return head_mask.to(dtype=self.dtype)


def _invert_attention_mask(self: Any, encoder_attention_mask: Tensor) -> Tensor:
    """transformers 4.x ``ModuleUtilsMixin.invert_attention_mask``: 1 keep, 0 -> dtype min."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    else:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _init_weights(self: Any) -> None:
    """transformers 4.x ``init_weights`` for a model without tied weights: apply ``_init_weights``.

    transformers 5's version ends in ``tie_weights``, which needs ``post_init`` to have run.
    """
    self.apply(self._init_weights)


def _refuse_checkpointing(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    raise RuntimeError("ImageReward gradient checkpointing needs fairscale (pip install fairscale)")


@contextmanager
def _import_shims() -> Iterator[None]:
    """Names the ImageReward files import that current libraries lack, visible during import."""
    import transformers
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    added: list[str] = []
    for name, obj in [
        ("apply_chunking_to_forward", pu.apply_chunking_to_forward),
        ("prune_linear_layer", pu.prune_linear_layer),
        ("find_pruneable_heads_and_indices", find_pruneable_heads_and_indices),
    ]:
        if not hasattr(mu, name):
            setattr(mu, name, obj)
            added.append(name)
    stubs: list[str] = []
    if importlib.util.find_spec("fairscale") is None:
        path = "fairscale.nn.checkpoint.checkpoint_activations"
        parts = path.split(".")
        for i in range(len(parts)):
            name = ".".join(parts[: i + 1])
            mod = types.ModuleType(name)
            mod.__path__ = []  # a package, so the next level can be imported
            sys.modules[name] = mod
            stubs.append(name)
        sys.modules[path].checkpoint_wrapper = _refuse_checkpointing  # type: ignore[attr-defined]
    verbosity = transformers.logging.get_verbosity()
    try:
        with warnings.catch_warnings():  # restores the filters blip.py replaces with "ignore"
            warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        for name in added:
            delattr(mu, name)
        for name in stubs:
            sys.modules.pop(name, None)


def imagereward_modules() -> types.SimpleNamespace:
    """The package's ``ImageReward``, ``med``, ``vit``, ``blip`` modules, importable on transformers 5."""
    global _modules
    if _modules is not None:
        return _modules
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "ImageReward needs the image-reward package: pip install --no-deps image-reward==1.5"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in [(ALIAS, root), (f"{ALIAS}.models", root / "models")]:
        if name not in sys.modules:  # empty packages: the real __init__ files are not run
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            pkg.__package__ = name
            sys.modules[name] = pkg
    with _import_shims():
        med = importlib.import_module(f"{ALIAS}.models.BLIP.med")
        vit = importlib.import_module(f"{ALIAS}.models.BLIP.vit")
        blip = importlib.import_module(f"{ALIAS}.models.BLIP.blip")
        blip_pretrain = importlib.import_module(f"{ALIAS}.models.BLIP.blip_pretrain")
        ir = importlib.import_module(f"{ALIAS}.ImageReward")
    med.BertModel.get_head_mask = _get_head_mask
    med.BertModel.invert_attention_mask = _invert_attention_mask
    med.BertModel.init_weights = _init_weights
    _modules = types.SimpleNamespace(
        ImageReward=ir, med=med, vit=vit, blip=blip, blip_pretrain=blip_pretrain, root=root
    )
    return _modules


def blip_tokenizer(source: str | os.PathLike) -> Any:
    """BLIP's text tokenizer (``blip.init_tokenizer``) from a local bert-base-uncased directory."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(source))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def build_imagereward(
    med_config: str | os.PathLike | dict[str, Any],
    tokenizer: Any,
    *,
    vit: str | dict[str, Any] = "large",
    image_size: int = IMAGE_SIZE,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The package's ``ImageReward`` model, assembled as its ``__init__`` does (random weights).

    ``vit`` is BLIP's ``'base'``/``'large'`` or keyword arguments for the package's
    ``VisionTransformer`` (tests); ``image_size`` sets the ViT input and the preprocessing.
    """
    m = imagereward_modules()
    if isinstance(vit, str):
        visual, vision_width = m.blip.create_vit(vit, image_size, False, 0, 0)
    else:
        visual = m.vit.VisionTransformer(img_size=image_size, **vit)
        vision_width = visual.embed_dim
    if isinstance(med_config, dict):
        config = m.med.BertConfig(**med_config)
    else:
        config = m.med.BertConfig.from_json_file(str(med_config))
    config.encoder_width = vision_width

    blip = m.blip_pretrain.BLIP_Pretrain.__new__(m.blip_pretrain.BLIP_Pretrain)
    nn.Module.__init__(blip)
    blip.visual_encoder = visual
    blip.tokenizer = tokenizer
    blip.text_encoder = m.med.BertModel(config=config, add_pooling_layer=False)
    text_width = blip.text_encoder.config.hidden_size
    blip.vision_proj = nn.Linear(vision_width, PROJ_DIM)
    blip.text_proj = nn.Linear(text_width, PROJ_DIM)

    cls = m.ImageReward.ImageReward
    model = cls.__new__(cls)
    nn.Module.__init__(model)
    model.blip = blip
    model.preprocess = m.ImageReward._transform(image_size)
    model.mlp = m.ImageReward.MLP(text_width)
    model.mean = REWARD_MEAN
    model.std = REWARD_STD
    return to_device(model, device)


def load_imagereward(
    checkpoint: str | os.PathLike,
    med_config: str | os.PathLike,
    tokenizer: Any,
    device: str | torch.device = "cpu",
    **build: Any,
) -> nn.Module:
    """ImageReward-v1.0 as ``ImageReward.load`` builds it, failing on any missing parameter.

    ``build``: :func:`build_imagereward`'s size arguments (the defaults are ImageReward-v1.0's).
    """
    model = build_imagereward(med_config, tokenizer, device="cpu", **build)
    fix = "fetch ImageReward.pt again (hf download THUDM/ImageReward ImageReward.pt)"
    state = load_torch_file(checkpoint, "image_reward weights", fix)
    try:  # the package loads non-strictly
        missing, _ = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"image_reward weights {checkpoint} do not fit ({detail}); {fix}") from None
    params = {n for n, _ in model.named_parameters()}
    if missing_params := sorted(set(missing) & params):
        raise RuntimeError(
            f"{checkpoint} lacks {len(missing_params)} ImageReward parameters "
            f"(first: {missing_params[0]}); is it ImageReward.pt?"
        )
    return to_device(model, device)


def to_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Move the model; ImageReward's methods put their inputs on ``model.device``."""
    model.device = device
    return model.to(device).eval()


@torch.inference_mode()
def score_images(
    model: nn.Module, images: Tensor, prompts: Sequence[str], batch_size: int = 16
) -> Tensor:
    """Per-sample ImageReward of images[i] for prompts[i], batched (``ImageReward.score``'s steps).

    Preprocess -> BLIP ViT -> BLIP text encoder cross-attending to the image tokens -> [CLS]
    feature -> MLP -> (r - mean) / std, in float32.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    device = next(model.parameters()).device
    pils = uint8_to_pil(images)
    out: list[Tensor] = []
    for i in range(0, len(pils), batch_size):
        x = torch.stack([model.preprocess(p) for p in pils[i : i + batch_size]]).to(device)
        text = model.blip.tokenizer(
            list(prompts[i : i + batch_size]),
            padding="max_length",
            truncation=True,
            max_length=MAX_TEXT_LEN,
            return_tensors="pt",
        ).to(device)
        image_embeds = model.blip.visual_encoder(x)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        text_output = model.blip.text_encoder(
            text.input_ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        feats = text_output.last_hidden_state[:, 0, :].float()
        rewards = (model.mlp(feats) - model.mean) / model.std
        out.append(rewards[:, 0].cpu())
    return torch.cat(out) if out else torch.zeros(0)


__all__ = [
    "blip_tokenizer",
    "build_imagereward",
    "find_pruneable_heads_and_indices",
    "imagereward_modules",
    "load_imagereward",
    "score_images",
    "to_device",
]
