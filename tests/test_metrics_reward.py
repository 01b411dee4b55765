"""ImageReward: the compatibility layer on transformers 5, a tiny random model of the package's
own classes scored our batched way and the package's way, and the missing-weights errors."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from cdmbench.backbones.base import Backbone
from cdmbench.errors import MissingWeightsError
from cdmbench.metrics.base import EvalSet, Value
from cdmbench.metrics.image_reward import ENV, ImageRewardScore
from cdmbench.prompts_io import Prompt
from cdmbench.registry import METRICS

HAVE_IR = importlib.util.find_spec("ImageReward") is not None
needs_ir = pytest.mark.skipif(
    not HAVE_IR, reason="image-reward not installed (pip install --no-deps image-reward==1.5)"
)

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "the", "on", "table", "##s", ".", ","]
PROMPTS = ["a photo of a red cat", "the blue dogs on the table."]
TINY_VIT = dict(patch_size=16, embed_dim=32, depth=1, num_heads=2)  # the package's ViT class
SIZE = 32  # input size of the tiny ViT (and of the preprocessing)


def _images(n: int, seed: int = 0, size: int = 48) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = nn.functional.interpolate(
        torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear", align_corners=False
    )
    return (x * 255).round().to(torch.uint8)


def _med_config(vocab_size: int, hidden: int = 32, heads: int = 2) -> dict:
    """BLIP's med_config.json keys, tiny sizes."""
    return dict(
        architectures=["BertModel"],
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=64,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        max_position_embeddings=64,
        model_type="bert",
        pad_token_id=0,
        type_vocab_size=2,
        vocab_size=vocab_size,
        encoder_width=hidden,
        add_cross_attention=True,
    )


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A WordPiece vocabulary in bert-base-uncased's layout (vocab.txt only)."""
    d = tmp_path_factory.mktemp("bert-tiny")
    (d / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n"
    )
    return d


@pytest.fixture(scope="module")
def tiny(tokenizer_dir):
    """The package's ImageReward class with a 1-block ViT and a 2-layer BERT, random weights."""
    if not HAVE_IR:
        pytest.skip("image-reward not installed")
    from cdmbench.metrics import _imagereward_compat as compat

    tok = compat.blip_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = compat.build_imagereward(_med_config(len(tok)), tok, vit=TINY_VIT, image_size=SIZE)
    with torch.no_grad():  # the package's MLP init (std 1/(d+1)) makes every reward ~ -mean/std
        for layer in model.mlp.layers:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0, layer.in_features**-0.5)
                layer.bias.normal_(0, 0.1)
    return model


# ---------------------------------------------------------------- the compatibility layer


@needs_ir
def test_import_under_transformers5_leaves_no_trace(monkeypatch):
    import transformers
    import transformers.modeling_utils as mu

    from cdmbench.metrics import _imagereward_compat as compat

    for name in [k for k in sys.modules if k.split(".")[0] == compat.ALIAS]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(compat, "_modules", None)
    filters = list(warnings.filters)
    verbosity = transformers.logging.get_verbosity()
    had_fairscale = importlib.util.find_spec("fairscale") is not None

    m = compat.imagereward_modules()
    assert m.ImageReward.ImageReward.__module__ == f"{compat.ALIAS}.ImageReward"
    assert Path(m.med.__file__).parent.parent.parent == m.root  # the package's own files
    # blip.py's global "ignore" and blip_pretrain.py's logging level are undone; no shims stay
    assert warnings.filters == filters
    assert transformers.logging.get_verbosity() == verbosity
    assert not hasattr(mu, "find_pruneable_heads_and_indices")
    assert had_fairscale or "fairscale" not in sys.modules
    assert "ImageReward" not in sys.modules  # the real package name is untouched


@needs_ir
def test_constants_are_the_packages():
    """Normalisation, input size and text length as ImageReward.py hard-codes them."""
    from cdmbench.metrics import _imagereward_compat as compat

    src = (compat.imagereward_modules().root / "ImageReward.py").read_text()
    assert f"self.mean = {compat.REWARD_MEAN!r}" in src
    assert f"self.std = {compat.REWARD_STD!r}" in src
    assert f"_transform({compat.IMAGE_SIZE})" in src
    assert f"max_length={compat.MAX_TEXT_LEN}" in src


@needs_ir
def test_builder_matches_the_packages_constructor(tokenizer_dir, tmp_path, monkeypatch):
    """ImageReward.__init__ itself (hub tokenizer and ViT-L swapped for the tiny ones) builds the
    same parameters as build_imagereward, and with the same weights scores the same."""
    from cdmbench.metrics import _imagereward_compat as compat

    m = compat.imagereward_modules()
    tok = compat.blip_tokenizer(tokenizer_dir)
    cfg = _med_config(len(tok), hidden=768, heads=12)  # the package hard-codes MLP(768)
    cfg["num_hidden_layers"] = 1
    (tmp_path / "med_config.json").write_text(json.dumps(cfg))
    seen = {}

    def create_vit(vit, image_size, *args):
        seen["vit"] = (vit, image_size, args)
        return m.vit.VisionTransformer(img_size=SIZE, **TINY_VIT), TINY_VIT["embed_dim"]

    monkeypatch.setattr(m.blip_pretrain, "init_tokenizer", lambda: tok)
    monkeypatch.setattr(m.blip_pretrain, "create_vit", create_vit)
    torch.manual_seed(0)
    theirs = m.ImageReward.ImageReward(med_config=str(tmp_path / "med_config.json")).eval()
    assert seen["vit"] == ("large", 224, (False, 0, 0))  # what build_imagereward's default does
    ours = compat.build_imagereward(
        tmp_path / "med_config.json", tok, vit=TINY_VIT, image_size=SIZE
    )
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    ours.load_state_dict(a, strict=True)
    theirs.preprocess = ours.preprocess  # the package's is for 224 px, its ViT-L's input
    pil = compat.uint8_to_pil(_images(1))[0]
    with torch.inference_mode():
        assert ours.score(PROMPTS[0], pil) == theirs.score(PROMPTS[0], pil)


# ---------------------------------------------------------------- scoring


@needs_ir
def test_scores_match_the_packages_methods(tiny):
    from cdmbench.metrics import _imagereward_compat as compat

    images = _images(2)
    pils = compat.uint8_to_pil(images)
    pairs = [(i, p) for p in range(2) for i in range(2)]  # 2 images x 2 prompts
    batch = images[[i for i, _ in pairs]]
    texts = [PROMPTS[p] for _, p in pairs]
    ours = compat.score_images(tiny, batch, texts, batch_size=4)
    assert ours.shape == (4,) and ours.dtype == torch.float32 and torch.isfinite(ours).all()
    assert ours.std() > 1e-3  # not degenerate: images and prompts change the reward
    torch.testing.assert_close(compat.score_images(tiny, batch, texts), ours, atol=0, rtol=0)
    torch.testing.assert_close(
        compat.score_images(tiny, batch, texts, batch_size=1), ours, atol=1e-5, rtol=0
    )
    with torch.inference_mode():
        for k, (i, p) in enumerate(pairs):  # ImageReward.score: one PIL image, one prompt
            assert ours[k].item() == pytest.approx(tiny.score(PROMPTS[p], pils[i]), abs=1e-5)
        for p in range(2):  # ImageReward.inference_rank: one prompt, a list of images
            ranks, rewards = tiny.inference_rank(PROMPTS[p], pils)
            assert rewards == pytest.approx(ours[2 * p : 2 * p + 2].tolist(), abs=1e-5)
            assert ranks == (torch.argsort(torch.argsort(-ours[2 * p : 2 * p + 2])) + 1).tolist()


@needs_ir
def test_grey_images_and_metric_compute(tiny):
    from cdmbench.metrics import _imagereward_compat as compat

    grey = _images(2, seed=3)[:, :1]
    torch.testing.assert_close(
        compat.score_images(tiny, grey, PROMPTS),
        compat.score_images(tiny, grey.expand(-1, 3, -1, -1), PROMPTS),
    )
    metric = ImageRewardScore()
    metric._model = tiny  # tests only: the metric itself loads nothing but ImageReward-v1.0
    metric.check()
    data = EvalSet(
        images=grey, prompts=[Prompt(str(i), t) for i, t in enumerate(PROMPTS)], backbone=Backbone()
    )
    value = metric.compute(data)["image_reward"]
    assert value == pytest.approx(float(compat.score_images(tiny, grey, PROMPTS).mean()))


@needs_ir
def test_load_roundtrip_and_missing_parameters(tiny, tokenizer_dir, tmp_path):
    from cdmbench.metrics import _imagereward_compat as compat

    cfg = _med_config(len(tiny.blip.tokenizer))
    (tmp_path / "med_config.json").write_text(json.dumps(cfg))
    torch.save(tiny.state_dict(), tmp_path / "ImageReward.pt")
    tok = compat.blip_tokenizer(tokenizer_dir)
    loaded = compat.load_imagereward(
        tmp_path / "ImageReward.pt",
        tmp_path / "med_config.json",
        tok,
        vit=TINY_VIT,
        image_size=SIZE,
    )
    images = _images(2, seed=4)
    torch.testing.assert_close(
        compat.score_images(loaded, images, PROMPTS), compat.score_images(tiny, images, PROMPTS)
    )
    state = tiny.state_dict()
    del state["mlp.layers.0.weight"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(RuntimeError, match="mlp.layers.0.weight"):
        compat.load_imagereward(
            tmp_path / "ImageReward.pt",
            tmp_path / "med_config.json",
            tok,
            vit=TINY_VIT,
            image_size=SIZE,
        )


# ---------------------------------------------------------------- weights, config


def _one_line(fn) -> str:
    t0 = time.perf_counter()
    with pytest.raises(MissingWeightsError) as exc:
        fn()
    assert time.perf_counter() - t0 < 5  # no network, no retries
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_missing_weights_one_line(tmp_path, monkeypatch, tokenizer_dir):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/ImageReward
    metric = ImageRewardScore(cache_dir=tmp_path)  # an empty Hugging Face cache
    _one_line(metric.check)
    msg = _one_line(metric.files)
    assert "ImageReward.pt" in msg and "THUDM/ImageReward" in msg and ENV in msg

    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    msg = _one_line(ImageRewardScore(cache_dir=tmp_path).files)
    assert str(tmp_path / "nowhere") in msg

    weights = tmp_path / "weights"
    weights.mkdir()
    for f in ("ImageReward.pt", "med_config.json"):
        (weights / f).write_bytes(b"")
    metric = ImageRewardScore(weights, cache_dir=tmp_path)
    assert metric.files() == (weights / "ImageReward.pt", weights / "med_config.json")
    msg = _one_line(metric.tokenizer_dir)
    assert "bert-base-uncased" in msg and str(weights / "bert-base-uncased") in msg
    if HAVE_IR:
        msg = _one_line(metric.check)
        assert "bert-base-uncased" in msg
    assert (
        ImageRewardScore(weights, tokenizer_dir, cache_dir=tmp_path).tokenizer_dir()
        == tokenizer_dir
    )


def test_registered_and_config_is_recorded():
    assert METRICS.get("image_reward") is ImageRewardScore
    cfg = ImageRewardScore().config()
    json.dumps(cfg)  # stored with every value
    assert cfg["model"] == "ImageReward-v1.0"
    assert "0.16717362830052426" in cfg["convention"]
    assert ImageRewardScore.values == {
        "image_reward": Value(higher_is_better=True, tolerance="0.1")
    }
