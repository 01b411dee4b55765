"""Measure the activation figures `cdmbench plan` reads: bytes saved for the backward per token.

For a backbone, builds its real transformer class at the real widths (the shipped plan config,
``cdmbench/backbones/assets/plan_<backbone>.json``) with one block of each kind and with one
more block of each kind, at two resolutions, runs one forward with gradients through the
backbone's own ``forward`` (the tiny twin's, for the latent layout and conditioning) and counts
the distinct storages autograd saves (``torch.autograd.graph.saved_tensors_hooks``; parameters
and buffers excluded, and under autocast the low-precision weight copies, which plan counts
from the parameter count). The counts are exact for what the graph keeps and the same method
works on CPU and GPU. From the four (or more) counts it solves, per image token and per text
token, the bytes of the one-block model ("base") and of each further block ("per_block"), in
float32 and under bf16 autocast, with and without gradient checkpointing, and writes them to
``cdmbench/backbones/assets/activation_figures.json``.

    python benchmarks/activation_figures.py --backbone sd3 [--device cuda] [--res 128,256]

CPU autocast keeps different dtypes than CUDA autocast for some ops: measure the bfloat16
figures on a GPU (``--device cuda``) where one is at hand; the file records where each entry
was measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.autograd.graph import saved_tensors_hooks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdmbench.plan import FIGURES_FILE, shipped_configs  # noqa: E402

KINDS = {  # backbone -> (tiny twin, block-count config keys in wrap-class order)
    "sd3": ("cdmbench.backbones.sd3:TinySD3", ("num_layers",)),
    "longcat": ("cdmbench.backbones.longcat:TinyLongCat", ("num_layers", "num_single_layers")),
}


def _twin(backbone: str):
    import importlib

    mod, cls = KINDS[backbone][0].split(":")
    return getattr(importlib.import_module(mod), cls)


def build(backbone: str, counts: tuple[int, ...], device: str) -> torch.nn.Module:
    """The backbone's transformer at its real widths with ``counts`` blocks of each kind
    (random weights: the bytes saved do not depend on their values)."""
    twin = _twin(backbone)
    cfg = dict(shipped_configs(twin)["components"]["transformer"])
    for key, n in zip(KINDS[backbone][1], counts, strict=True):
        cfg[key] = n
    torch.manual_seed(0)
    return twin.classes["transformer"].from_config(cfg).to(device)


def saved_bytes(
    backbone: str,
    model: torch.nn.Module,
    res: int,
    device: str,
    dtype: str,
    checkpointing: bool,
    text_scale: float = 1.0,
) -> tuple[int, int, int]:
    """(activation bytes, weight-copy bytes, text tokens) one sample's forward through
    ``model`` (from :func:`build`) saves, with ``text_scale`` times the backbone's text
    tokens."""
    twin = _twin(backbone)
    info = shipped_configs(twin)
    cfg = model.config
    bb = twin(device=device, resolution=res, dtype="float32", train_dtype="float32")
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.train()
    text = info["text_tokens"]
    n_text = text.get("fixed", 0) + getattr(bb.settings, text.get("setting", ""), 0)
    n_text = round(n_text * text_scale)
    cond = {"prompt_embeds": torch.randn(1, n_text, cfg["joint_attention_dim"], device=device)}
    if "pooled_projection_dim" in cfg and backbone == "sd3":
        cond["pooled_projections"] = torch.randn(1, cfg["pooled_projection_dim"], device=device)
    x = torch.randn(1, *bb.latent_shape, device=device)
    s = torch.full((1,), 0.5, device=device)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    shapes = {tuple(p.shape) for p in model.parameters()}
    shapes |= {s[::-1] for s in shapes}  # linear layers may save the transposed copy
    act: dict[int, int] = {}
    casts: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in own:
            low = dtype != "float32" and t.dtype != torch.float32 and tuple(t.shape) in shapes
            (casts if low else act)[ptr] = st.nbytes()
        return t

    ac = torch.autocast(
        torch.device(device).type, dtype=getattr(torch, dtype), enabled=dtype != "float32"
    )
    with saved_tensors_hooks(pack, lambda t: t), ac:
        bb.forward(model, x, s, cond)
    return sum(act.values()), sum(casts.values()), n_text


def _variant(backbone: str, counts: tuple[int, ...], device: str, cases, points) -> list:
    """Per (dtype, checkpointing) case: the activation bytes and text tokens at each point
    (resolution, text scale), of one model with ``counts`` blocks."""
    model = build(backbone, counts, device)
    out = []
    for dtype, ck in cases:
        got = [saved_bytes(backbone, model, res, device, dtype, ck, sc) for res, sc in points]
        out.append(([a for a, _, _ in got], [t for _, _, t in got]))
    return out


def measure(backbone: str, device: str, resolutions: tuple[int, int]) -> dict:
    twin = _twin(backbone)
    kinds = [c.__name__ for c in twin.fsdp_wrap_classes]
    nk = len(kinds)
    variants = [tuple([1] * nk)] + [tuple(2 if j == i else 1 for j in range(nk)) for i in range(nk)]
    out: dict = {"blocks": dict.fromkeys(kinds, 1)}
    # two resolutions at the full text length, the first again at half of it: image and text
    # tokens both vary, so each gets its own figure
    points = ((resolutions[0], 1.0), (resolutions[1], 1.0), (resolutions[0], 0.5))
    cases = [(d, ck) for d in ("float32", "bfloat16") for ck in (False, True)]
    counts: dict[tuple, list[int]] = {(c, v): [] for c in cases for v in variants}
    # one full-width model at a time, each in a process of its own: host memory holds one
    spawn = multiprocessing.get_context("spawn")
    for v in variants:
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            got = pool.submit(_variant, backbone, v, device, cases, points).result()
        for case, (ys, txts) in zip(cases, got, strict=True):
            counts[case, v] = ys
            rows = [((res // 16) ** 2, t) for (res, _), t in zip(points, txts, strict=True)]
    m = np.array(rows, dtype=float)

    def fit(y):
        return [round(float(v), 1) for v in np.linalg.lstsq(m, y, rcond=None)[0]]

    for dtype, ck in cases:
        ys = {v: np.array(counts[(dtype, ck), v], dtype=float) for v in variants}
        per = {kind: fit(ys[variants[i + 1]] - ys[variants[0]]) for i, kind in enumerate(kinds)}
        out.setdefault(dtype, {})["checkpointing" if ck else "full"] = {
            "base": fit(ys[variants[0]]),
            "per_block": per,
        }
        print(backbone, dtype, "checkpointing" if ck else "full", out[dtype], flush=True)
    out["measured"] = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine(),
        "torch": torch.__version__,
        "resolutions": list(resolutions),
        "method": "saved_tensors_hooks, distinct storages, parameters/buffers/weight copies excluded",
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="sd3", choices=sorted(KINDS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--res", default="128,256", help="two resolutions, comma-separated")
    ap.add_argument("--out", default=str(FIGURES_FILE))
    a = ap.parse_args()
    res = tuple(int(r) for r in a.res.split(","))
    entry = measure(a.backbone, a.device, res)
    path = Path(a.out)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[a.backbone] = entry
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
