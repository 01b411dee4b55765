"""Does scoring memory grow with the sample set? Peak RSS of FID scoring per number of images.

Generates a sample set of 256-px RGB PNGs (smooth random images) and a 500-image reference
folder, then scores FID on the first N images with the sharded driver
(``cdmbench.scoring.score_sample_set``, one process), each N in a fresh process, which reports
its peak resident set size (``ru_maxrss``) when it ends. The driver streams
256-image chunks (PNGs decoded in a thread pool, the next chunk read ahead) and FID needs
only float64 moments, so the peak should not depend on N: the figure of merit is
peak(N) / peak(smallest N), target <= 1.2 (issue 14). The reference statistics are computed
once beforehand and copied into each run's fresh cache, so every run does the same work
per image.

Feature network (``--network``):

- ``inception-stem`` (default): a randomly initialised torchvision InceptionV3 (the FID
  architecture, 21.8M parameters, held in memory on the device) inside
  ``InceptionFeatures`` (clean-fid's resize of every image to 299 x 299, scaling to
  [-1, 1]), whose features are its first conv block (Conv2d_1a_3x3: conv, BN, ReLU) average
  pooled to 8 x 8, i.e. 32 x 64 = 2048-d. Everything that scales with the images (decode,
  resize, chunk buffers, feature rows, moments) is the full pipeline's; the full network's
  deeper activations (a constant per batch) are left out, which if anything makes the
  ratio stricter. A 2-core CPU runs the whole network at ~0.5 s per image (~3 h for 20k).
- ``inception``: the whole random InceptionV3 to pool3 (2048-d), for a machine with a GPU
  or time.

A control shows the measurement sees growth: a fresh process that loads the smallest set
whole, as evaluation did before (``np.stack`` of every decoded PNG, then contiguous).

    python benchmarks/eval_memory.py                          # 2,000 vs 20,000 images
    python benchmarks/eval_memory.py --sizes 2000,10000 --network inception --device cuda

Prints a table and writes results/benchmarks/eval_memory.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.2
SIZE = 256
N_REF = 500
CHUNK = 256


def _image(i: int, seed: int):
    """One smooth random 256-px RGB image (uint8 [H, W, 3])."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, i])
    low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return np.asarray(low.resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def _write_range(args: tuple[str, int, int, int]) -> None:
    from PIL import Image

    folder, start, end, seed = args
    for i in range(start, end):
        path = Path(folder) / f"{i:06d}-00000.png"
        if not path.is_file():
            Image.fromarray(_image(i, seed)).save(path, format="PNG", compress_level=1)


def make_images(folder: Path, n: int, seed: int, workers: int = 2) -> None:
    """``n`` PNGs named like a sample set's files (one sample per prompt id)."""
    from multiprocessing import get_context

    folder.mkdir(parents=True, exist_ok=True)
    step = max(1, n // (workers * 8))
    jobs = [(str(folder), s, min(n, s + step), seed) for s in range(0, n, step)]
    with get_context("spawn").Pool(workers) as pool:
        pool.map(_write_range, jobs)


def _network(kind: str):
    import torch
    import torchvision
    from torch import nn

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    net.fc = nn.Identity()
    if kind == "inception":
        return net.eval()

    class Stem(nn.Module):
        """The whole random InceptionV3 held; features from its first conv block."""

        def __init__(self, inception: nn.Module) -> None:
            super().__init__()
            self.inception = inception

        def forward(self, x):
            y = self.inception.Conv2d_1a_3x3(x)  # [B, 32, 149, 149]
            return nn.functional.adaptive_avg_pool2d(y, 8).flatten(1)  # [B, 2048]

    return Stem(net).eval()


def _fid(args) -> dict:
    """In the child: FID of the first ``n`` images with the sharded driver."""
    import resource

    import torch

    from cdmbench.backbones.base import Backbone
    from cdmbench.metrics.base import EvalSet
    from cdmbench.metrics.features import InceptionFeatures
    from cdmbench.metrics.fid import FID
    from cdmbench.prompts_io import Prompt
    from cdmbench.scoring import score_sample_set

    torch.set_num_threads(args.threads)
    feats = InceptionFeatures(model=_network(args.network), batch_size=64, device=args.device)
    metric = FID(feats, reference=str(args.work / "ref"), device=args.device)
    files = [f"{i:06d}-00000.png" for i in range(args.n)]
    prompts = [Prompt(f"{i:06d}", "a photo") for i in range(args.n)]
    bb = Backbone(args.device)
    data = EvalSet(torch.empty(0), prompts, bb, cache_dir=args.cache)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    values = score_sample_set(
        args.work / "samples", f"n{args.n}", files, prompts, {"fid": metric}, data, CHUNK
    )
    return {
        "fid": values["fid"]["fid"],
        "score_s": time.perf_counter() - t0,
        "rss_before_scoring_mb": before,
    }


def _control(args) -> dict:
    """In the child: the whole set loaded at once, as evaluation loaded it before."""
    import numpy as np
    import torch
    from PIL import Image

    arrs = []
    for i in range(args.n):
        with Image.open(args.work / "samples" / f"{i:06d}-00000.png") as im:
            arrs.append(np.asarray(im))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    return {"image_mb": x.numel() / 2**20}


def child(args) -> None:
    import resource

    out = _control(args) if args.control else _fid(args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print("RESULT " + json.dumps(out), flush=True)


def measure(args, n: int, control: bool = False) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=args.work))
    for f in (args.work / "ref-cache").glob("*.npz"):
        shutil.copy(f, cache)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--n",
        str(n),
        "--work",
        str(args.work),
        "--cache",
        str(cache),
        "--network",
        args.network,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ] + (["--control"] if control else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    out, err = proc.stdout, proc.stderr
    wall = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    return {**result, "peak_rss_mb": round(result["peak_rss_mb"], 1), "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2000,20000")
    p.add_argument("--network", choices=("inception-stem", "inception"), default="inception-stem")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cdmbench-eval-mem")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "eval_memory.csv")
    p.add_argument("--keep", action="store_true", help="keep the generated images")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--control", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    sizes = sorted(int(s) for s in args.sizes.split(","))
    info = bu.machine_info(args.threads)
    t0 = time.perf_counter()
    make_images(args.work / "samples", sizes[-1], seed=1)
    make_images(args.work / "ref", N_REF, seed=2)
    print(f"{sizes[-1]} + {N_REF} PNGs ready in {time.perf_counter() - t0:.0f} s", flush=True)
    # reference statistics once, into a cache every measurement starts from
    ref_cache = args.work / "ref-cache"
    ref_cache.mkdir(exist_ok=True)
    _warm_reference(args, ref_cache)

    rows = []
    first = None
    for n in sizes:
        r = measure(args, n)
        first = first or r["peak_rss_mb"]
        rows.append(
            {
                "what": "fid (sharded driver, 1 process)",
                "n_images": n,
                "image_px": SIZE,
                "network": args.network,
                "chunk": CHUNK,
                "device": args.device,
                "peak_rss_mb": r["peak_rss_mb"],
                "ratio_to_first": round(r["peak_rss_mb"] / first, 4),
                "ok": "yes" if r["peak_rss_mb"] / first <= TARGET else "no",
                "fid": round(r["fid"], 4),
                "score_s": round(r["score_s"], 1),
                "wall_s": r["wall_s"],
            }
        )
        print(rows[-1], flush=True)
    c = measure(args, sizes[0], control=True)
    rows.append(
        {
            "what": "control: whole set loaded (before)",
            "n_images": sizes[0],
            "image_px": SIZE,
            "peak_rss_mb": c["peak_rss_mb"],
            "image_mb": round(c["image_mb"], 1),
            "wall_s": c["wall_s"],
        }
    )
    print(rows[-1], flush=True)
    path = bu.write_csv(args.out, rows, info)
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(args.work / "samples", ignore_errors=True)


def _warm_reference(args, ref_cache: Path) -> None:
    """The reference statistics of the chosen network, cached for every measurement."""
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import eval_memory as em;"
        "from cdmbench.backbones.base import Backbone;"
        "from cdmbench.metrics.features import InceptionFeatures;"
        "from cdmbench.metrics.reference import resolve_reference;"
        "torch.set_num_threads(int(sys.argv[5]));"
        "f = InceptionFeatures(model=em._network(sys.argv[3]), batch_size=64, device=sys.argv[4]);"
        "resolve_reference(sys.argv[2] + '/ref', Backbone()).stats(f, sys.argv[2] + '/ref-cache')"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(Path(__file__).resolve().parent),
            str(args.work),
            args.network,
            args.device,
            str(args.threads),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )


if __name__ == "__main__":
    main()
