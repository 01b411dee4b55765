"""Latency of the SD3-Medium architecture at 1024x1024 in bf16: cdmbench's sampler vs the
diffusers pipeline on the same schedule, at 1, 2, 4 and 28 steps, with and without CFG.

Latency does not depend on weight values, so the full-size transformer and VAE are built from
SD3-Medium's configs with random weights: no download. Text encoding is excluded on both sides
(pre-computed embeddings of SD3's shapes: 333 tokens x 4096, pooled 2048), so the comparison is
denoiser loop + VAE decode. Timing: warm-up calls, then repeats with CUDA synchronisation;
median and p90 per image at batch 1.

    python benchmarks/gpu_latency.py                 # on a GPU; writes results/gpu_latency.csv
    python benchmarks/gpu_latency.py --tiny --device cpu --repeats 2   # smoke test of the script
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from cdmbench import flow
from cdmbench.backbones.sd3 import SD3
from cdmbench.plan import shipped_configs

_REAL = shipped_configs(SD3)["components"]  # SD3-Medium's real configs, as cdmbench ships them
SD3_MEDIUM = _REAL["transformer"]
SD3_VAE = _REAL["vae"]
TINY = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    num_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=32,
    out_channels=16,
    pos_embed_max_size=16,
)
TINY_VAE = dict(SD3_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)


def build(tiny: bool, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(**(TINY if tiny else SD3_MEDIUM)).to(device, dtype).eval()
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD3_VAE)).to(device, dtype).eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return tr, vae, sched


def timed(fn, device: str, warmup: int, repeats: int) -> list[float]:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--tiny", action="store_true", help="tiny configs (CPU smoke test of this script)"
    )
    ap.add_argument("--steps", default="1,2,4,28")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--csv", default="results/gpu_latency.csv")
    args = ap.parse_args()
    from diffusers import StableDiffusion3Pipeline

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    tr, vae, sched = build(args.tiny, args.device, dtype)
    cfgt = tr.config
    res = cfgt.sample_size * 8
    seq, dim, pooled = (
        (16, cfgt.joint_attention_dim, cfgt.pooled_projection_dim)
        if args.tiny
        else (333, 4096, 2048)
    )
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, seq, dim, generator=g).to(args.device, dtype)
    pp = torch.randn(1, pooled, generator=g).to(args.device, dtype)
    ne, npool = torch.zeros_like(pe), torch.zeros_like(pp)
    latents = torch.randn(1, 16, res // 8, res // 8, generator=g).to(args.device)
    pipe = StableDiffusion3Pipeline(
        transformer=tr,
        scheduler=sched,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)

    def velocity_fn(w: float):
        def v(x, s):
            t = flow.timestep(s)
            if w == 1.0:
                return tr(
                    hidden_states=x.to(dtype),
                    timestep=t,
                    encoder_hidden_states=pe,
                    pooled_projections=pp,
                    return_dict=False,
                )[0]
            out = tr(
                hidden_states=torch.cat([x, x]).to(dtype),
                timestep=torch.cat([t, t]),
                encoder_hidden_states=torch.cat([ne, pe]),
                pooled_projections=torch.cat([npool, pp]),
                return_dict=False,
            )[0].float()
            u, c = out.chunk(2)
            return flow.cfg(u, c, w)

        return v

    @torch.inference_mode()
    def ours(n: int, w: float):
        x = flow.sample(velocity_fn(w), latents, flow.uniform_schedule(n, 3.0))
        return vae.decode(
            (x / vae.config.scaling_factor + vae.config.shift_factor).to(dtype)
        ).sample

    @torch.inference_mode()
    def theirs(n: int, w: float):
        sig = np.linspace(1.0, 0.0, n + 1)[:-1].tolist()
        return pipe(
            prompt_embeds=pe,
            pooled_prompt_embeds=pp,
            negative_prompt_embeds=ne,
            negative_pooled_prompt_embeds=npool,
            latents=latents.to(dtype),
            sigmas=sig,
            guidance_scale=w,
            height=res,
            width=res,
            output_type="pt",
        ).images

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows = []
    for w in (1.0, 7.0):
        for n in [int(s) for s in args.steps.split(",")]:
            a, b = [], []
            for _ in range(max(1, args.repeats // 5)):  # interleave blocks so drift hits both
                a += timed(lambda n=n, w=w: ours(n, w), args.device, args.warmup, 5)
                b += timed(lambda n=n, w=w: theirs(n, w), args.device, args.warmup, 5)
            row = {
                "device": device_name,
                "dtype": str(dtype).replace("torch.", ""),
                "torch": torch.__version__,
                "resolution": res,
                "steps": n,
                "guidance": w,
                "network_calls": n * (1 if w == 1 else 2),
                "cdmbench_ms": 1e3 * statistics.median(a),
                "cdmbench_p90_ms": 1e3 * float(np.percentile(a, 90)),
                "diffusers_ms": 1e3 * statistics.median(b),
                "diffusers_p90_ms": 1e3 * float(np.percentile(b, 90)),
            }
            row["ratio"] = row["cdmbench_ms"] / row["diffusers_ms"]
            rows.append(row)
            print(
                f"steps {n:>2} cfg {w:g}: cdmbench {row['cdmbench_ms']:.1f} ms, diffusers "
                f"{row['diffusers_ms']:.1f} ms, ratio {row['ratio']:.3f}",
                flush=True,
            )
    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(args.csv) or ".", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    os.replace(tmp, args.csv)
    print(f"wrote {args.csv} ({device_name})")


if __name__ == "__main__":
    main()
