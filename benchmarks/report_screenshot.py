"""An HTML report of a tiny-sd3 run with every reward and diversity metric, screenshotted in
headless Chromium: the layout check of the report for the new metrics, offline, on CPU.

    HF_HUB_OFFLINE=1 python benchmarks/report_screenshot.py [--work DIR] [--iters 4]

1. ``cdmbench train cdm --backbone tiny-sd3`` for a few iterations (random tiny SD3);
2. ``cdmbench eval`` of the student and the teacher at 1, 2 and 4 steps on three prompts, two
   samples each, with clip_score, clip_score_cos, pickscore, aesthetic, hpsv2, image_reward,
   intra_lpips and vendi. Every metric runs its real code path on a tiny network of its real
   architecture with random weights (as the tests build them): transformers CLIPModels saved as
   directories (PickScore, the cosine CLIP score, the aesthetic CLIP and a matching MLP head),
   open_clip configs of the ViT-L-14 / ViT-H-14 layout with fewer, narrower layers (CLIP score,
   HPSv2), the image-reward package's BLIP with a 1-block ViT and a 2-layer BERT, LPIPS with a
   random AlexNet trunk. The records' metric configs name these networks (directories called
   ``RANDOM-tiny-...``, ``weights: none (random weights)``). THE NUMBERS ARE MEANINGLESS: the
   layout is the point;
3. ``cdmbench report`` and a headless-Chromium screenshot of report.html to
   ``results/benchmarks/report-tiny-sd3.png``.

The metrics are swapped in by registering, in this process, subclasses under the built-in names
whose default constructors point at the tiny networks; ``cdmbench eval`` then runs in-process
through its CLI entry point (training and the report run as ordinary subprocesses).
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

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a red fox sitting in a snowy forest",
    "a bowl of ramen on a wooden table, studio lighting",
    "a lighthouse on a cliff at sunset",
]
METRIC_NAMES = [
    "clip_score",
    "clip_score_cos",
    "pickscore",
    "aesthetic",
    "hpsv2",
    "image_reward",
    "intra_lpips",
    "vendi",
]
# open_clip configs with the real layouts' keys, fewer and narrower layers, the real 224-px input
TINY_L14 = "RANDOM-tiny-ViT-L-14-layout"
TINY_H14 = "RANDOM-tiny-ViT-H-14-layout"
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
BERT_WORDS = ["a", "of", "on", "the", "in", "at", "red", "fox", "snowy", "forest", "bowl"]


def log(msg: str) -> None:
    print(f"[report_screenshot] {msg}", flush=True)


# ------------------------------------------------------------------------- tiny networks
def write_tiny_networks(d: Path) -> dict[str, Path]:
    """Tiny random networks on disk, seeded: the same files every run."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_clip import write_model, write_processor

    from cdmbench.metrics.aesthetic import MLP

    paths = {
        "clip": d / "RANDOM-tiny-clip-vit-large-patch14-layout",
        "pick_model": d / "RANDOM-tiny-PickScore_v1-layout",
        "pick_processor": d / "RANDOM-tiny-CLIP-ViT-H-14-processor",
        "aesthetic_head": d / "RANDOM-tiny-aesthetic-head.pth",
        "bert": d / "RANDOM-tiny-bert-vocab",
    }
    if not paths["clip"].is_dir():
        write_model(paths["clip"], seed=1)
        write_processor(paths["clip"])  # CLIP repos hold model and processor files together
    if not paths["pick_model"].is_dir():
        write_model(paths["pick_model"], seed=2)
        write_processor(paths["pick_processor"])
    if not paths["aesthetic_head"].is_file():
        torch.manual_seed(3)
        head = MLP(16)  # the tiny CLIP's projection width
        with torch.no_grad():  # scores that vary from image to image, of order one
            for layer in head.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.normal_(0, layer.in_features**-0.5)
                    layer.bias.normal_(0, 0.1)
        torch.save(head.state_dict(), paths["aesthetic_head"])
    paths["bert"].mkdir(parents=True, exist_ok=True)
    (paths["bert"] / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]) + "\n"
    )
    return paths


def register_tiny_metrics(paths: dict[str, Path]) -> None:
    """The built-in metric names bound to subclasses built on the tiny networks."""
    import open_clip.factory
    import torch
    from torch import nn

    from cdmbench.metrics.aesthetic import LaionAesthetic
    from cdmbench.metrics.clip_cos import ClipScoreCos
    from cdmbench.metrics.clip_score import ClipScore
    from cdmbench.metrics.diversity import IntraLPIPS, Vendi
    from cdmbench.metrics.hps import HPSv2
    from cdmbench.metrics.image_reward import ImageRewardScore
    from cdmbench.metrics.pickscore import PickScore
    from cdmbench.registry import METRICS

    for name in (TINY_L14, TINY_H14):
        open_clip.factory._MODEL_CONFIGS[name] = json.loads(json.dumps(TINY_OPEN_CLIP))

    def seeded(cls, seed: int):
        """``cls`` whose random weights are drawn from ``seed`` when loaded."""

        def load(self, device="cpu"):
            torch.manual_seed(seed)
            return cls.load(self, device)

        return type(f"Tiny{cls.__name__}", (cls,), {"load": load})

    class TinyClipScore(seeded(ClipScore, 10)):
        def __init__(self) -> None:
            super().__init__(TINY_L14, pretrained=None, batch_size=16)

    class TinyClipScoreCos(ClipScoreCos):
        def __init__(self) -> None:
            super().__init__(paths["clip"], batch_size=16)

    class TinyPickScore(PickScore):
        def __init__(self) -> None:
            super().__init__(paths["pick_model"], paths["pick_processor"], batch_size=16)

    class TinyAesthetic(LaionAesthetic):
        def __init__(self) -> None:
            super().__init__(paths["clip"], paths["aesthetic_head"], batch_size=16)

    class TinyHPSv2(seeded(HPSv2, 11)):
        def __init__(self) -> None:
            super().__init__(None, model=TINY_H14, pretrained=False, batch_size=16)

    class TinyIntraLPIPS(seeded(IntraLPIPS, 12)):
        def __init__(self) -> None:
            super().__init__(pretrained=False, batch_size=16)

    class TinyVendi(seeded(Vendi, 12)):
        def __init__(self) -> None:
            super().__init__(pretrained=False, batch_size=16)

    class TinyImageReward(ImageRewardScore):
        """The package's ImageReward class, 1-block ViT (32 px) and 2-layer BERT, random."""

        def __init__(self) -> None:
            super().__init__(batch_size=16)
            self._model = None

        def config(self):
            return {
                **super().config(),
                "model": "ImageReward class, RANDOM tiny BLIP (ViT 1 block, 32 px; BERT 2 layers)",
                "weights": "none (random weights)",
            }

        def check(self, backbone=None) -> None:
            from importlib.util import find_spec

            if find_spec("ImageReward") is None or find_spec("timm") is None:
                raise RuntimeError("image_reward needs image-reward and timm installed")

        def load(self, device="cpu"):
            if self._model is None:
                from cdmbench.metrics import _imagereward_compat as compat

                tok = compat.blip_tokenizer(paths["bert"])
                torch.manual_seed(13)
                from test_metrics_reward import _med_config  # tests/ is on sys.path

                med = _med_config(len(tok))  # the reward tests' tiny BLIP text config
                vit = dict(patch_size=16, embed_dim=32, depth=1, num_heads=2)
                model = compat.build_imagereward(med, tok, vit=vit, image_size=32)
                with torch.no_grad():  # the package's head init gives every image one reward
                    for layer in model.mlp.layers:
                        if isinstance(layer, nn.Linear):
                            layer.weight.normal_(0, layer.in_features**-0.5)
                            layer.bias.normal_(0, 0.1)
                self._model = model.eval().to(device)
            return self._model

    tiny = {
        "clip_score": TinyClipScore,
        "clip_score_cos": TinyClipScoreCos,
        "pickscore": TinyPickScore,
        "aesthetic": TinyAesthetic,
        "hpsv2": TinyHPSv2,
        "image_reward": TinyImageReward,
        "intra_lpips": TinyIntraLPIPS,
        "vendi": TinyVendi,
    }
    for name, cls in tiny.items():
        METRICS.register(name, cls, description=f"{name} on RANDOM tiny networks (layout check)")


# ------------------------------------------------------------------------------ steps
def cdmbench(*args: str) -> None:
    cmd = [sys.executable, "-c", "from cdmbench.cli import main; main()", *args]
    log("cdmbench " + " ".join(args))
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def screenshot(page: Path, png: Path, width: int, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            page.resolve().as_uri(),
        ]
        log(" ".join(cmd[:1] + ["..."] + cmd[-3:]))
        subprocess.run(cmd, check=True, timeout=180, capture_output=True)
    if not png.is_file() or png.stat().st_size == 0:
        raise SystemExit(f"chromium wrote no screenshot to {png}")
    crop_blank_bottom(png)


def crop_blank_bottom(png: Path, margin: int = 24) -> None:
    """The window is taller than the page: cut the white rows below its end."""
    import numpy as np
    from PIL import Image

    img = Image.open(png).convert("RGB")
    rows = np.flatnonzero((np.asarray(img.convert("L")) < 250).any(axis=1))
    if len(rows) and rows[-1] + margin < img.height:
        img = img.crop((0, 0, img.width, int(rows[-1]) + margin))
    img.save(png, optimize=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--iters", type=int, default=4, help="CDM training iterations")
    ap.add_argument("--num-samples", type=int, default=2, help="samples per prompt (>= 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "results/benchmarks/report-tiny-sd3.png")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument(
        "--height", type=int, default=4000, help="window height; white rows below the page are cut"
    )
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    t0 = time.perf_counter()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="cdmbench-report-")
        work = Path(tmp.name)
    else:
        work = args.work.resolve()
        work.mkdir(parents=True, exist_ok=True)
    try:
        runs, results = work / "runs", work / "results"
        cdmbench(
            "train", "cdm", "--backbone", "tiny-sd3", "--iters", str(args.iters),
            "--out", str(runs), "--device", "cpu",
        )  # fmt: skip
        log(f"trained ({time.perf_counter() - t0:.0f} s)")

        paths = write_tiny_networks(work / "tiny-random-networks")
        register_tiny_metrics(paths)
        prompt_file = work / "prompts.txt"
        prompt_file.write_text("\n".join(PROMPTS) + "\n")
        from cdmbench.cli import main as cli_main

        argv_eval = [
            "eval", "--backbone", "tiny-sd3", "--methods", "cdm,teacher", "--steps", "1,2,4",
            "--metrics", ",".join(METRIC_NAMES), "--prompts", str(prompt_file),
            "--num-samples", str(args.num_samples), "--runs", str(runs),
            "--samples", str(work / "samples"), "--results", str(results), "--device", "cpu",
        ]  # fmt: skip
        log("cdmbench " + " ".join(argv_eval) + "  (in-process, tiny random metric networks)")
        cli_main(argv_eval)
        log(f"evaluated ({time.perf_counter() - t0:.0f} s)")

        report = work / "report"
        cdmbench(
            "report", "--results", str(results), "--out", str(report), "--samples-per-cell", "4"
        )
        screenshot(report / "report.html", args.out, args.width, args.height)
        size = args.out.stat().st_size
        log(f"wrote {args.out} ({size / 1024:.0f} KiB) in {time.perf_counter() - t0:.0f} s")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
