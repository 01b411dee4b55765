"""FID feature extraction throughput: cdmbench's InceptionFeatures versus clean-fid's own path.

Both sides get the same uint8 images and run the same feature network; what differs is the
pipeline around it.

- cdmbench (A): ``InceptionFeatures(model=net)`` called on uint8 [N, C, H, W]: clean-fid's
  "clean" resize (Pillow bicubic on float32, per channel, 299 x 299; grey images resized once
  and replicated; a thread pool over images), ``(x - 128) / 128``, the network, in batches.
  The resize stage is timed with the pool at its default size (``threads=None``: min(8,
  usable cores)) and at one thread; the whole pipeline at the default.
- clean-fid (B): ``cleanfid.fid.get_model_features`` (clean-fid's loop for in-memory
  generators: per image ``img.numpy().transpose(1, 2, 0)`` -> ``build_resizer("clean")`` ->
  tensor, concatenated, then ``get_batch_features``) with clean-fid's own
  ``InceptionV3W.forward`` (normalisation ``(x - 128) / 128``, then ``layers``) behind
  ``DataParallel``, as ``cleanfid.features.feature_extractor`` builds it. Grey images are
  handed over as RGB (replicated), as clean-fid's loaders ``convert('RGB')``.

On a CPU the network is ~99% of the whole pipeline (about 0.25 s per image on one thread), so
the "resize + network" rows mostly measure the machine's noise; the resize rows are where the
two pipelines differ. cdmbench resizes batch k + 1 in a background thread while the network
runs on batch k (on a GPU this takes the resize off the critical path; on a 2-core CPU the two
compete for cores). Also reported: the per-batch glue ``InceptionFeatures._net`` (the
network's ``eval().to(device)`` on first use, a cached lookup afterwards).

The network: clean-fid's weights (``inception-2015-12-05.pt``, TorchScript) cannot be
downloaded here, and cdmbench never substitutes random weights silently, so the benchmark
builds the same architecture itself: the FID Inception of clean-fid's
``cleanfid.inception_pytorch`` (pytorch-fid's port of the TensorFlow graph the TorchScript
file also encodes: torchvision Inception v3 with the FIDInceptionA/C/E blocks, pool3 2048-d)
with random weights, its BatchNorm statistics set from one random batch so activations keep
a trained network's scale (no denormals). Both sides call this one module, so the network
stage costs the same by construction; the rows "resize" time the resize stage alone, where
the pipelines really differ. Features of both sides are checked to be identical first.

    python benchmarks/fid_features.py                        # 8x8 grey, 64x64 and 1024x1024 RGB
    python benchmarks/fid_features.py --sizes 64 --n 16 --reps 3

Prints a markdown table (images/s, ratio cdmbench / clean-fid) and writes
results/benchmarks/fid_features.csv. Target: cdmbench >= clean-fid (ratio >= 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from cdmbench.metrics.features import InceptionFeatures, clean_resize  # noqa: E402


# ------------------------------------------------------------------------------ network
def random_fid_inception(seed: int = 0) -> nn.Module:
    """clean-fid's FID Inception architecture (pool3, input in [-1, 1]) with random weights."""
    import cleanfid.inception_pytorch as ip

    def build():  # ip.fid_inception_v3 without the weight download
        inc = ip._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        inc.Mixed_5b = ip.FIDInceptionA(192, pool_features=32)
        inc.Mixed_5c = ip.FIDInceptionA(256, pool_features=64)
        inc.Mixed_5d = ip.FIDInceptionA(288, pool_features=64)
        inc.Mixed_6b = ip.FIDInceptionC(768, channels_7x7=128)
        inc.Mixed_6c = ip.FIDInceptionC(768, channels_7x7=160)
        inc.Mixed_6d = ip.FIDInceptionC(768, channels_7x7=160)
        inc.Mixed_6e = ip.FIDInceptionC(768, channels_7x7=192)
        inc.Mixed_7b = ip.FIDInceptionE_1(1280)
        inc.Mixed_7c = ip.FIDInceptionE_2(2048)
        return inc

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        orig, ip.fid_inception_v3 = ip.fid_inception_v3, build
        try:
            net = ip.InceptionV3(output_blocks=[3], resize_input=False, normalize_input=False)
        finally:
            ip.fid_inception_v3 = orig
        for m in net.modules():  # BatchNorm statistics from one random batch
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.reset_running_stats()
        net.train()
        with torch.no_grad():
            net(torch.rand(4, 3, 299, 299) * 2 - 1)
    return Pool3(net).eval().requires_grad_(False)


class Pool3(nn.Module):
    """[B, 3, 299, 299] in [-1, 1] -> [B, 2048, 1, 1] (the shape clean-fid's ``layers`` gives)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[0]


def cleanfid_model_fn(layers: nn.Module):
    """clean-fid's feature_extractor('torchscript_inception', resize_inside=False) around ``layers``."""
    from cleanfid.inception_torchscript import InceptionV3W

    m = InceptionV3W.__new__(InceptionV3W)  # its __init__ would load the TorchScript file
    nn.Module.__init__(m)
    m.layers, m.resize_inside = layers, False
    model = nn.DataParallel(m.eval())  # clean-fid's default use_dataparallel=True

    def model_fn(x):
        return model(x)

    return model_fn


# --------------------------------------------------------------------------------- paths
def cleanfid_features(images: torch.Tensor, model_fn, batch: int) -> np.ndarray:
    """clean-fid's get_model_features over a 'generator' that hands out ``images`` in order."""
    from cleanfid.fid import get_model_features

    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    if len(rgb) % batch:
        raise ValueError(
            "clean-fid's get_model_features needs whole batches: n must be a multiple of batch"
        )
    it = iter(rgb.split(batch))
    return get_model_features(
        lambda z: next(it),
        model_fn,
        mode="clean",
        num_gen=len(rgb),
        batch_size=batch,
        device=torch.device("cpu"),
        verbose=False,
    )


def cleanfid_resize(images: torch.Tensor) -> torch.Tensor:
    """The resize stage of get_model_features alone (clean-fid's per-image loop)."""
    from cleanfid.resize import build_resizer

    fn = build_resizer("clean")
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    out = [
        torch.tensor(fn(img.cpu().numpy().transpose((1, 2, 0))).transpose((2, 0, 1))).unsqueeze(0)
        for img in rgb
    ]
    return torch.cat(out)


def test_images(size: str, n: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, C, S, S]; '8g' = grey 8x8 (digits), '64' = RGB 64x64 (tiny-sd3), ..."""
    grey = size.endswith("g")
    s = int(size.rstrip("g"))
    g = torch.Generator().manual_seed(seed)
    # smooth random images (a resize of random noise) rather than white noise
    base = torch.rand((n, 1 if grey else 3, max(2, s // 4), max(2, s // 4)), generator=g)
    img = torch.nn.functional.interpolate(base, size=(s, s), mode="bilinear", align_corners=False)
    return (img * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="8g,64,1024", help="image sizes; a trailing g means grey")
    ap.add_argument("--n", type=int, default=16, help="images per timed call (full pipeline)")
    ap.add_argument("--batch", type=int, default=8, help="network batch size, both sides")
    ap.add_argument("--reps", type=int, default=4, help="samples per side, full pipeline")
    ap.add_argument("--resize-n", type=int, default=64, help="images per timed call (resize stage)")
    ap.add_argument("--resize-reps", type=int, default=10)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (the network, both sides)"
    )
    ap.add_argument("--csv", default="results/benchmarks/fid_features.csv")
    args = ap.parse_args()
    bu.setup_threads(args.threads)
    info = bu.machine_info(args.threads)
    print(bu.describe(info), flush=True)
    net = random_fid_inception()
    model_fn = cleanfid_model_fn(net)
    ours = {
        "auto": InceptionFeatures(model=net, batch_size=args.batch),
        "1": InceptionFeatures(model=net, batch_size=args.batch, threads=1),
    }
    rows = []

    def add(stage, size, variant, n, ta, tb, reps, extra=None):
        s = bu.summarize(ta, tb)
        r = {
            "stage": stage,
            "images": size,
            "cdmbench": variant,
            "n": n,
            "reps": reps,
            "cdmbench_img_s": n / (s["harness_ms"] / 1e3),
            "cleanfid_img_s": n / (s["bare_ms"] / 1e3),
            **s,
            "speedup": 1 / s["ratio"],
            "speedup_min": 1 / s["ratio_min"],
            "cpu_speedup": 1 / s["cpu_ratio"],
            **(extra or {}),
        }
        r["ok"] = "yes" if r["speedup"] >= 1.0 else "NO"
        rows.append(r)
        bu.print_row(r, COLS, HEADERS)

    for size in args.sizes.split(","):
        # identical inputs -> identical features (the comparison is like for like)
        probe = test_images(size, args.batch, seed=1)
        fa, fb = (
            ours["auto"](probe),
            torch.from_numpy(cleanfid_features(probe, model_fn, args.batch)),
        )
        diff = float((fa - fb).abs().max() / fb.abs().max())
        ra, rb = clean_resize(probe), cleanfid_resize(probe)
        if diff > 1e-5 or not torch.equal(ra, rb):
            raise SystemExit(
                f"{size}: cdmbench and clean-fid disagree (features rel diff {diff:.3g}, resize "
                f"equal {torch.equal(ra, rb)}); the comparison is not like for like"
            )
        # resize stage alone
        imgs = test_images(size, args.resize_n)
        for variant, threads in (("threads auto", None), ("threads 1", 1)):
            a = lambda threads=threads, imgs=imgs: clean_resize(imgs, threads=threads)  # noqa: E731
            b = lambda imgs=imgs: cleanfid_resize(imgs)  # noqa: E731
            ta, tb = bu.interleaved(
                a, b, args.resize_reps, bu.calibrate([a, b], 0.05, max_number=50), warmup=1
            )
            add("resize", size, variant, args.resize_n, ta, tb, args.resize_reps)
        # the whole pipeline (cdmbench as the FID metric builds it: default resize pool)
        imgs = test_images(size, args.n)
        a = lambda imgs=imgs: ours["auto"](imgs)  # noqa: E731
        b = lambda imgs=imgs: cleanfid_features(imgs, model_fn, args.batch)  # noqa: E731
        ta, tb = bu.interleaved(a, b, args.reps, number=1, warmup=1)
        add(
            "resize + network",
            size,
            "threads auto",
            args.n,
            ta,
            tb,
            args.reps,
            {"feature_rel_diff": diff},
        )

    # glue inside InceptionFeatures.forward per batch: _net() (eval + to once, then a cached lookup)
    prep = bu.Samples()
    for _ in range(args.resize_reps):
        prep.add(bu._sample2(lambda: ours["auto"]._net(torch.device("cpu")), 5))
    prep_ms = 1e3 * sorted(prep)[len(prep) // 2]
    rows.append(
        {
            "stage": "InceptionFeatures._net per batch",
            "images": "",
            "cdmbench": "",
            "n": "",
            "reps": args.resize_reps,
            "harness_ms": prep_ms,
            "ok": "(info)",
        }
    )

    bu.finish(
        args.csv,
        rows,
        info,
        "FID feature extraction: cdmbench InceptionFeatures vs clean-fid (same images, same network)",
        bu.markdown([r for r in rows if r["ok"] != "(info)"], COLS, HEADERS)
        + f"\n\nInceptionFeatures._net() per batch (eval + to on first use, then cached): {prep_ms:.4f} ms",
        f"network: clean-fid's FID Inception architecture with random weights, batch {args.batch}, "
        f"{args.threads} torch thread(s); images/s = n / median wall time; speedup = clean-fid time / "
        f"cdmbench time (target >= 1); speedup (CPU) compares total process CPU time (all threads, so a "
        f"resize pool of 2 threads costs CPU even where it saves wall time)",
    )


COLS = [
    "stage",
    "images",
    "cdmbench",
    "n",
    "cdmbench_img_s",
    "cleanfid_img_s",
    "speedup",
    "pair_ratio_q1",
    "pair_ratio_q3",
    "speedup_min",
    "cpu_speedup",
    "ok",
]
HEADERS = [
    "stage",
    "images",
    "cdmbench resize pool",
    "n",
    "cdmbench img/s",
    "clean-fid img/s",
    "speedup (wall)",
    "pair q1 (A/B)",
    "pair q3 (A/B)",
    "speedup of mins",
    "speedup (CPU)",
    ">= 1",
]

if __name__ == "__main__":
    main()
