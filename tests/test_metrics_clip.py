"""CLIP score: torchmetrics' convention on identical embeddings, the open_clip path end to end
(random weights of a small real architecture), and the missing-weights error."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from cdmbench.backbones.base import Backbone
from cdmbench.errors import MissingWeightsError
from cdmbench.metrics.base import EvalSet, Value
from cdmbench.metrics.clip_score import (
    ClipScore,
    aggregate_clip_score,
    clip_score_from_embeddings,
    uint8_to_pil,
)
from cdmbench.prompts_io import Prompt
from cdmbench.registry import METRICS

TEXTS = [
    "a photo of a cat",
    "a red dog",
    "two blue birds on a wire",
    "an empty street at night",
    "a bowl of fruit on a wooden table",
]
SMALL = "ViT-S-32-alt"  # the smallest architecture open_clip ships


def _images(n: int, seed: int = 0, size: int = 32) -> Tensor:
    """Smooth random uint8 images (low-frequency noise, upsampled), [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


# ---------------------------------------------------------------- torchmetrics reference


class _FeaturesAsTensors(nn.Module):
    """transformers 4's ``get_*_features`` contract, which torchmetrics 1.9 relies on.

    In transformers 5 ``CLIPModel.get_image_features`` / ``get_text_features`` return a
    ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the projected embedding;
    torchmetrics' ``_clip_score_update`` calls ``.norm`` on the result directly.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny random transformers CLIPModel and a CLIPProcessor built offline.

    The tokenizer is OpenAI's CLIP BPE, written as vocab.json/merges.txt from the copy that ships
    inside open_clip (open_clip names the two special tokens differently).
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    st = SimpleTokenizer()
    vocab = dict(st.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    d = tmp_path_factory.mktemp("clip_tokenizer")
    (d / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(st.bpe_ranks, key=st.bpe_ranks.get)
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    tokenizer = CLIPTokenizer.from_pretrained(str(d))
    assert len(tokenizer) == 49408 and tokenizer("a cat")["input_ids"] == [49406, 320, 2368, 49407]
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
        projection_dim=16,
    )
    return _FeaturesAsTensors(CLIPModel(config).eval()), processor


def test_embeddings_match_torchmetrics(hf_clip):
    from torchmetrics.functional.multimodal.clip_score import (
        _clip_score_update,
        _get_features,
        clip_score,
    )
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = hf_clip
    images = list(_images(5))
    cpu = torch.device("cpu")
    with torch.inference_mode():
        ref, n = _clip_score_update(images, TEXTS, model, processor)
        img = _get_features(images, "image", cpu, model, processor)
        txt = _get_features(TEXTS, "text", cpu, model, processor)
        ours = clip_score_from_embeddings(img, txt)
        assert n == 5 and ours.shape == (5,)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        assert ours.abs().max() <= 100

        # the aggregate: functional (whole set and every single pair, so both signs occur)
        # and the module accumulating over two updates
        fetch = lambda: (model, processor)  # noqa: E731  (torchmetrics accepts a callable)
        assert aggregate_clip_score(ours) == pytest.approx(
            float(clip_score(images, TEXTS, fetch)), abs=1e-5
        )
        signs = set()
        for i in range(5):  # the same shapes as torchmetrics' call (text padding is per batch)
            one = clip_score_from_embeddings(
                _get_features([images[i]], "image", cpu, model, processor),
                _get_features([TEXTS[i]], "text", cpu, model, processor),
            )
            signs.add(bool(one > 0))
            assert aggregate_clip_score(one) == pytest.approx(
                float(clip_score(images[i], TEXTS[i], fetch)), abs=1e-5
            )
        assert signs == {True, False}  # the clamp was exercised
        module = CLIPScore(fetch)
        module.update(images[:2], TEXTS[:2])
        module.update(images[2:], TEXTS[2:])
        assert aggregate_clip_score(ours) == pytest.approx(float(module.compute()), abs=1e-5)


def test_aggregate_clamps_the_mean_not_each_sample():
    assert aggregate_clip_score(torch.tensor([30.0, -10.0])) == pytest.approx(10.0)
    assert aggregate_clip_score(torch.tensor([30.0, -50.0])) == 0.0
    e = torch.randn(3, 8)
    torch.testing.assert_close(clip_score_from_embeddings(e, 2.5 * e), torch.full((3,), 100.0))
    torch.testing.assert_close(clip_score_from_embeddings(e, -e), torch.full((3,), -100.0))


# ---------------------------------------------------------------- open_clip end to end


@pytest.fixture(scope="module")
def small_metric():
    torch.manual_seed(0)
    metric = ClipScore(SMALL, pretrained=None, batch_size=4)
    with pytest.warns(UserWarning, match="random weights"):
        metric.load("cpu")
    return metric


def test_open_clip_end_to_end(small_metric):
    import open_clip

    images = _images(5, seed=1)
    s = small_metric.scores(images, TEXTS)
    assert s.shape == (5,) and s.dtype == torch.float32
    assert torch.isfinite(s).all() and s.abs().max() <= 100

    # deterministic, and independent of the batch size
    torch.testing.assert_close(small_metric.scores(images, TEXTS), s, atol=0, rtol=0)
    small_metric.batch_size = 2
    try:
        torch.testing.assert_close(small_metric.scores(images, TEXTS), s, atol=1e-4, rtol=0)
    finally:
        small_metric.batch_size = 4

    # the same as open_clip's documented usage, one pair at a time
    model, preprocess, tokenizer = small_metric.load()
    with torch.inference_mode():
        for i, pil in enumerate(uint8_to_pil(images)):
            fi = model.encode_image(preprocess(pil)[None])
            ft = model.encode_text(tokenizer([TEXTS[i]]))
            ref = 100 * torch.cosine_similarity(fi, ft).item()
            assert s[i].item() == pytest.approx(ref, abs=1e-4)

    # the EvalSet path reports torchmetrics' aggregate, in [0, 100]
    data = EvalSet(
        images=images, prompts=[Prompt(str(i), t) for i, t in enumerate(TEXTS)], backbone=Backbone()
    )
    value = small_metric.compute(data)["clip_score"]
    assert 0.0 <= value <= 100.0 and value == pytest.approx(max(float(s.mean()), 0.0), abs=1e-5)

    # the recorded preprocessing is the one open_clip built
    cfg = small_metric.config()
    built = open_clip.get_model_preprocess_cfg(model)
    assert cfg["preprocess"]["size"] == list(built["size"])
    assert cfg["preprocess"]["mean"] == pytest.approx(list(built["mean"]))
    assert cfg["preprocess"]["std"] == pytest.approx(list(built["std"]))


def test_grey_images_are_converted_to_rgb(small_metric):
    grey = _images(2, seed=2)[:, :1]
    torch.testing.assert_close(
        small_metric.scores(grey, TEXTS[:2]),
        small_metric.scores(grey.expand(-1, 3, -1, -1), TEXTS[:2]),
    )
    with pytest.raises(ValueError, match="uint8"):
        small_metric.scores(grey.float(), TEXTS[:2])


# ---------------------------------------------------------------- config, weights


def test_registered_and_config_is_recorded():
    assert METRICS.get("clip_score") is ClipScore
    m = ClipScore()
    cfg = m.config()
    json.dumps(cfg)  # stored with every value
    assert cfg["model"] == "ViT-L-14" and cfg["pretrained"] == "openai"
    assert cfg["convention"].startswith("max(mean_i 100*cos")
    assert cfg["quick_gelu"] is True  # OpenAI's weights were trained with QuickGELU
    assert (
        cfg["preprocess"]["size"] == [224, 224] and cfg["preprocess"]["interpolation"] == "bicubic"
    )
    assert ClipScore.values == {"clip_score": Value(higher_is_better=True, tolerance="1.0")}


def _one_line_error(metric: ClipScore) -> str:
    t0 = time.perf_counter()
    with pytest.raises(MissingWeightsError) as exc:
        metric.check()
    assert time.perf_counter() - t0 < 5  # no network, no retries
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_weights_one_line(tmp_path):
    msg = _one_line_error(ClipScore("ViT-L-14", "openai", cache_dir=tmp_path))
    assert "ViT-L-14/openai" in msg and "timm/vit_large_patch14_clip_224.openai" in msg
    assert str(tmp_path) in msg
    msg = _one_line_error(ClipScore(SMALL, str(tmp_path / "missing.safetensors")))
    assert "missing.safetensors" in msg
    with pytest.raises(ValueError, match="unknown open_clip pretrained tag"):
        ClipScore("ViT-L-14", "no-such-tag").check()
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipScore("ViT-Q-99", "openai").check()


def test_weights_found_in_the_hub_cache(tmp_path):
    """The lookup open_clip's download would hit, done locally: refs/main -> snapshot file."""
    repo = tmp_path / "models--timm--vit_large_patch14_clip_224.openai"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"")
    metric = ClipScore("ViT-L-14", "openai", cache_dir=tmp_path)
    metric.check()
    assert Path(metric.checkpoint()) == snap / "open_clip_model.safetensors"
    kwargs = metric.create_kwargs()  # the tag's own settings go with the local file
    assert kwargs["pretrained"] == str(snap / "open_clip_model.safetensors")
    assert kwargs["force_quick_gelu"] is True and kwargs["image_interpolation"] == "bicubic"
    assert kwargs["image_mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_local_checkpoint_file(small_metric, tmp_path):
    """pretrained=FILE loads that file (here: the small model's own weights) and nothing else."""
    from safetensors.torch import save_file

    model, _, _ = small_metric.load()
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    metric = ClipScore(SMALL, str(path), batch_size=4)
    assert metric.create_kwargs()["pretrained"] == str(path)
    images = _images(3, seed=5)
    torch.testing.assert_close(
        metric.scores(images, TEXTS[:3]), small_metric.scores(images, TEXTS[:3]), atol=1e-5, rtol=0
    )
