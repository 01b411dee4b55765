"""How close `cdmbench plan`'s estimate is to the measured peak memory of real training steps.

Each configuration trains CDM (the paper's method, two student forwards with gradients) on an
SD3 transformer at the real widths (1536 wide, 24 heads, SD3-Medium's embedders and 192-patch
position table) with 1 or 2 blocks, on CPU in float32, with the tiny twin's text encoders and
VAE (the transformer's text widths follow them). It runs in a fresh Python process: the
baseline is that process's resident memory once the libraries are imported and the backbone's
frozen components are built, and the peak is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after
three iterations of the real :class:`~cdmbench.training.core.Trainer` (update ratio 2: the
third iteration updates the fake score and then the student with both optimizers' states and
the fake score's gradients allocated, the steady state of a run). measured =
peak - baseline + the frozen components plan counts (their parameters, measured directly).
RSS, not a Python allocation tracer: torch allocates tensor memory outside Python's allocator.
glibc keeps freed blocks, so RSS peaks can only over-state the true peak.

    python benchmarks/plan_accuracy.py            # writes results/benchmarks/plan_accuracy.csv
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "results" / "benchmarks" / "plan_accuracy.csv"

# (blocks, resolution, batch, gradient checkpointing)
CONFIGS = [(1, 128, 2, False), (2, 128, 4, False), (2, 256, 2, False), (2, 256, 2, True)]


def wide_sd3(layers: int, res: int, checkpointing: bool):
    """A tiny-sd3 backbone whose transformer has SD3-Medium's widths and ``layers`` blocks."""
    import torch
    from diffusers import SD3Transformer2DModel

    from cdmbench.backbones.sd3 import TinySD3
    from cdmbench.plan import shipped_configs

    cfg = dict(shipped_configs(TinySD3)["components"]["transformer"])
    cfg |= {"num_layers": layers, "sample_size": res // 8, "joint_attention_dim": 64}
    cfg |= {"pooled_projection_dim": 64}  # the tiny text encoders' widths

    class WideSD3(TinySD3):
        @classmethod
        def tiny_builders(cls):
            return {**TinySD3.tiny_builders(), "transformer": lambda: SD3Transformer2DModel(**cfg)}

        def _load(self, name):
            if name != "transformer":
                return super()._load(name)
            with torch.random.fork_rng(devices=[]):  # no cached copy of the weights
                torch.manual_seed(0)
                return SD3Transformer2DModel(**cfg).eval()

    return WideSD3, WideSD3(resolution=res, gradient_checkpointing=checkpointing)


def child(layers: int, res: int, batch: int, checkpointing: bool) -> None:
    """One measurement, in this (fresh) process; prints a JSON line."""
    import os
    import resource
    import tempfile

    import torch

    torch.set_num_threads(2)
    from cdmbench.methods.cdm import CDM
    from cdmbench.plan import build_architecture, estimate
    from cdmbench.training.core import TrainConfig, Trainer

    cls, bb = wide_sd3(layers, res, checkpointing)
    frozen = 0
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        part = bb.component(name)
        frozen += sum(p.numel() * p.element_size() for p in part.parameters())
    bb.encode(bb.prompts("train")[:1])  # the text path's own buffers before the baseline
    rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    base = max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    method = CDM(CDM.Config(n_max=2))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(bb, method, TrainConfig(iters=3, batch=batch, device="cpu"), tmp)
        for _ in range(3):  # the second student update runs with every optimizer state present
            trainer.step(trainer.next_batch())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    arch = build_architecture(cls, bb.settings, device="cpu")
    plan = estimate(arch, CDM, batch, gpus=1, checkpointing=checkpointing)
    print(
        json.dumps(
            {
                "blocks": layers,
                "resolution": res,
                "batch": batch,
                "checkpointing": checkpointing,
                "measured_gb": round((peak - base + frozen) / 1e9, 3),
                "plan_gb": round(plan.total / 1e9, 3),
                "plan_activations_gb": round(plan.rows["activations"] / 1e9, 3),
            }
        )
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        layers, res, batch, ck = (int(v) for v in sys.argv[2:6])
        child(layers, res, batch, bool(ck))
        return
    done_rows = {}  # rows already measured (the CSV is written after each configuration)
    if OUT.is_file():
        with open(OUT) as f:
            for r in csv.DictReader(f):
                key = (int(r["blocks"]), int(r["resolution"]), int(r["batch"]))
                done_rows[key + (r["checkpointing"] == "True",)] = r
    rows = []
    for layers, res, batch, ck in CONFIGS:
        if (layers, res, batch, ck) in done_rows:
            rows.append(done_rows[(layers, res, batch, ck)])
            continue
        cmd = [sys.executable, __file__, "--child", str(layers), str(res), str(batch), str(int(ck))]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["error_pct"] = round(100 * (row["plan_gb"] / row["measured_gb"] - 1), 1)
        print(row, flush=True)
        rows.append(row)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with open(OUT, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
