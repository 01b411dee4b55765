"""Does the sampler add cost? cdmbench's generation path versus a hand-written loop.

Harness (A): exactly what :func:`cdmbench.generate.generate` runs for one batch, given the
noise and an encoded ``Cond``: ``flow.sample`` over ``backbone.velocity`` (CFG batched in one
call when the guidance is not 1), under ``torch.inference_mode``, then ``backbone.decode``.
Bare (B): the same network calls written by hand: the model called directly (digits:
``model(x, 1000 s, labels)``; tiny-sd3: the diffusers transformer with its keyword inputs),
one batched call for CFG, the Euler update in place, the same decode written out (digits:
``(x + 1) / 2`` clamped; tiny-sd3: the VAE's ``decode`` of ``x / scaling + shift``).
Before timing, both are checked to give the same images.

An A/A row per backbone and batch times the bare loop against itself: its distance from 1 is
the noise floor of the machine at that moment. Also timed: ``flow.seeded_noise`` (per-sample seeded noise, part of ``generate`` but not of
the network loop) against one ``torch.randn`` of the same shape, as its own row.

    python benchmarks/sampling_overhead.py                  # digits b1/b256, tiny-sd3 b1/b4
    python benchmarks/sampling_overhead.py --backbones digits --reps 10 --threads 2
    python benchmarks/sampling_overhead.py --profile digits:1:4:1   # backbone:batch:steps:cfg

On digits both paths are also timed with a network that returns its input (the null rows):
what is left is the code around the network alone, and 1 + that extra time / the bare loop's
time with the real network ("harness cost (null net)") is the harness's systematic overhead,
free of the machine noise that moves the wall ratio by a few percent either way.

Prints a markdown table and writes results/benchmarks/sampling_overhead.csv. Target (DESIGN
section 9): ratio of medians <= 1.02 at every step count.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny-sd3 is built offline
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from cdmbench import flow  # noqa: E402
from cdmbench.backbones import get_backbone  # noqa: E402
from cdmbench.backbones.base import Backbone, Cond  # noqa: E402
from cdmbench.training.method import SamplerSpec  # noqa: E402

TARGET = 1.02


# ---------------------------------------------------------------------------- the two paths
def harness_fn(bb: Backbone, model, noise, cond: Cond, spec: SamplerSpec):
    """generate()'s per-batch body, minus encode and seeded noise (given), plus decode."""

    @torch.inference_mode()
    def run():
        velocity = lambda x, s, c=cond: bb.velocity(model, x, s, c, spec.guidance)  # noqa: E731
        lat = flow.sample(velocity, noise, spec.sigmas, stochastic=spec.stochastic, renoise=None)
        return bb.decode(lat)

    return run


def bare_digits(model, noise, cond: Cond, sigmas: list[float], w: float):
    labels, null = cond.tensors["label"], cond.null["label"]
    b = noise.shape[0]

    @torch.inference_mode()
    def run():
        x = noise.clone()
        y = labels if w == 1.0 else torch.cat([null.expand(b), labels])
        t = 1000.0 * torch.tensor(sigmas, dtype=torch.float32)
        for n in range(len(sigmas) - 1):
            if w == 1.0:
                v = model(x, t[n].expand(b), y)
            else:
                v_u, v_c = model(torch.cat([x, x]), t[n].expand(2 * b), y).chunk(2)
                v = v_u + w * (v_c - v_u)
            x.add_(v, alpha=sigmas[n + 1] - sigmas[n])
        return ((x + 1) / 2).clamp_(0, 1)

    return run


def bare_sd3(bb, model, noise, cond: Cond, sigmas: list[float], w: float):
    emb, pooled = cond.tensors["prompt_embeds"], cond.tensors["pooled_projections"]
    b = noise.shape[0]
    if w != 1.0:
        emb = torch.cat([cond.null["prompt_embeds"].expand(b, -1, -1), emb])
        pooled = torch.cat([cond.null["pooled_projections"].expand(b, -1), pooled])
    vae = bb.component("vae")
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor

    @torch.inference_mode()
    def run():
        x = noise.clone()
        t = 1000.0 * torch.tensor(sigmas, dtype=torch.float32)
        for n in range(len(sigmas) - 1):
            if w == 1.0:
                v = model(
                    hidden_states=x,
                    timestep=t[n].expand(b),
                    encoder_hidden_states=emb,
                    pooled_projections=pooled,
                    return_dict=False,
                )[0]
            else:
                v_u, v_c = model(
                    hidden_states=torch.cat([x, x]),
                    timestep=t[n].expand(2 * b),
                    encoder_hidden_states=emb,
                    pooled_projections=pooled,
                    return_dict=False,
                )[0].chunk(2)
                v = v_u + w * (v_c - v_u)
            x.add_(v, alpha=sigmas[n + 1] - sigmas[n])
        return (vae.decode(x / sf + sh, return_dict=False)[0] / 2 + 0.5).clamp_(0, 1)

    return run


# ------------------------------------------------------------------------------- set-up
def load(name: str):
    """(backbone, teacher, prompts) or a note why the backbone is skipped."""
    try:
        bb = get_backbone(name)
        model = bb.load_teacher()
        prompts = bb.prompts("test")
    except Exception as e:  # noqa: BLE001 - an optional backbone whose weights are absent is skipped, not fatal
        return None, f"{name} skipped: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return (bb, model, prompts), None


def inputs(bb: Backbone, prompts, batch: int):
    ps = [prompts[i % len(prompts)] for i in range(batch)]
    seeds = [flow.sample_seed(0, p.id, i) for i, p in enumerate(ps)]
    return ps, seeds, bb.encode(ps), flow.seeded_noise(bb.latent_shape, seeds, device=bb.device)


# the hand-written loop of each backbone family this benchmark knows
BARE = {"digits": lambda bb, *args: bare_digits(*args), "sd3": bare_sd3, "tiny-sd3": bare_sd3}


def make_pair(name: str, bb, model, noise, cond, sigmas, w):
    a = harness_fn(bb, model, noise, cond, SamplerSpec(sigmas, guidance=w))
    return a, BARE[name](bb, model, noise, cond, sigmas, w)


# --------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backbones", default="digits,tiny-sd3")
    ap.add_argument("--steps", default="1,2,4,8")
    ap.add_argument("--digits-batches", default="1,256")
    ap.add_argument("--sd3-batches", default="1,4")
    ap.add_argument("--reps", type=int, default=60, help="samples per side (interleaved)")
    ap.add_argument("--target-ms", type=float, default=10.0, help="least duration of one sample")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default="results/benchmarks/sampling_overhead.csv")
    ap.add_argument("--no-null", action="store_true", help="skip the null-network rows")
    ap.add_argument(
        "--profile", default="", help="backbone:batch:steps:cfg - cProfile both paths and exit"
    )
    args = ap.parse_args()
    bu.setup_threads(args.threads)
    info = bu.machine_info(args.threads)
    print(bu.describe(info), flush=True)
    steps = [int(s) for s in args.steps.split(",")]

    if args.profile:
        return profile(args.profile)

    rows, notes = [], []
    for name in args.backbones.split(","):
        loaded, note = load(name)
        if loaded is None:
            notes.append(note)
            print(note, flush=True)
            continue
        bb, model, prompts = loaded
        batches = {"digits": args.digits_batches}.get(name, args.sd3_batches)
        for batch in (int(x) for x in batches.split(",")):
            ps, seeds, cond, noise = inputs(bb, prompts, batch)
            for w in dict.fromkeys((1.0, float(bb.default_teacher_guidance))):
                for n in steps:
                    sigmas = flow.uniform_schedule(n, bb.shift)
                    a, b = make_pair(name, bb, model, noise, cond, sigmas, w)
                    err = float((a() - b()).abs().max())
                    if err > 1e-4:
                        raise SystemExit(
                            f"{name} b{batch} {n} steps cfg {w}: harness and bare loop "
                            f"disagree (max |diff| {err:.3g}); the comparison is not fair"
                        )
                    number = bu.calibrate([a, b], args.target_ms / 1e3)
                    ta, tb = bu.interleaved(a, b, args.reps, number)
                    r = {
                        "what": "sample+decode",
                        "backbone": name,
                        "batch": batch,
                        "steps": n,
                        "guidance": w,
                        "calls_per_sample": number,
                        "reps": args.reps,
                        **bu.summarize(ta, tb),
                        "max_abs_diff": err,
                    }
                    r["ok"] = "yes" if r["ratio"] <= TARGET else "NO"
                    rows.append(r)
                    bu.print_row(r, COLS, HEADERS)
            # A/A control: the bare loop against itself, the noise floor of this machine
            n = steps[len(steps) // 2]
            sigmas = flow.uniform_schedule(n, bb.shift)
            _, b1 = make_pair(name, bb, model, noise, cond, sigmas, 1.0)
            _, b2 = make_pair(name, bb, model, noise, cond, sigmas, 1.0)
            number = bu.calibrate([b1, b2], args.target_ms / 1e3)
            ta, tb = bu.interleaved(b1, b2, args.reps, number)
            r = {
                "what": "A/A control: bare vs bare",
                "backbone": name,
                "batch": batch,
                "steps": n,
                "guidance": 1.0,
                "calls_per_sample": number,
                "reps": args.reps,
                **bu.summarize(ta, tb),
                "ok": "(noise)",
            }
            rows.append(r)
            bu.print_row(r, COLS, HEADERS)
            # per-sample seeded noise, its own row (part of generate, not of the network loop)
            g = torch.Generator().manual_seed(0)
            shape, dev = bb.latent_shape, bb.device
            a = lambda s=seeds, shape=shape, dev=dev: flow.seeded_noise(shape, s, device=dev)  # noqa: E731
            b = lambda n=batch, shape=shape, g=g: torch.randn((n, *shape), generator=g)  # noqa: E731
            number = bu.calibrate([a, b], args.target_ms / 1e3)
            ta, tb = bu.interleaved(a, b, args.reps, number)
            r = {
                "what": "seeded_noise vs one randn",
                "backbone": name,
                "batch": batch,
                "steps": "",
                "guidance": "",
                "calls_per_sample": number,
                "reps": args.reps,
                **bu.summarize(ta, tb),
                "max_abs_diff": "",
                "ok": "(info)",
            }
            rows.append(r)
            bu.print_row(r, COLS, HEADERS)

    nulls = []
    if "digits" in args.backbones.split(",") and not args.no_null:
        bb = get_backbone("digits")
        nulls = null_rows(
            bb,
            bb.prompts("test"),
            [int(x) for x in args.digits_batches.split(",")],
            steps,
            args.reps,
            args.target_ms / 1e3,
        )
        # the harness's own cost relative to the real loop: 1 + (extra us with a null network) /
        # (bare loop with the real network); steadier than the wall ratio, whose noise is the
        # machine's (see the A/A rows)
        extra = {(r["batch"], r["steps"], r["guidance"]): r["extra_us"] for r in nulls}
        for r in rows:
            k = (r["batch"], r["steps"], r["guidance"])
            if r["what"] == "sample+decode" and r["backbone"] == "digits" and k in extra:
                r["systematic_ratio"] = 1 + extra[k] / (1e3 * r["bare_ms"])
    body = bu.markdown(rows, COLS, HEADERS)
    if nulls:
        body += (
            "\n\nCost of the code around the network (digits, network replaced by identity):\n\n"
            + bu.markdown(nulls, NULL_COLS, NULL_HEADERS)
        )
    body += "".join(f"\n\nnote: {n}" for n in notes)
    bu.finish(
        args.csv,
        rows + nulls + [{"what": "note", "backbone": n} for n in notes],
        info,
        "Sampling overhead: cdmbench sampler + decode vs a hand-written loop",
        body,
        f"ratio = median(harness) / median(bare), {args.reps} interleaved samples each; target <= {TARGET}",
    )


COLS = [
    "what",
    "backbone",
    "batch",
    "steps",
    "guidance",
    "harness_ms",
    "bare_ms",
    "ratio",
    "pair_ratio_q1",
    "pair_ratio_q3",
    "ratio_min",
    "cpu_ratio",
    "systematic_ratio",
    "ok",
]
HEADERS = [
    "what",
    "backbone",
    "batch",
    "steps",
    "cfg",
    "harness ms",
    "bare ms",
    "ratio (wall)",
    "pair q1",
    "pair q3",
    "ratio of mins",
    "ratio (CPU)",
    "harness cost (null net)",
    "wall <= 1.02",
]
NULL_COLS = [
    "backbone",
    "batch",
    "steps",
    "guidance",
    "harness_us",
    "bare_us",
    "extra_us",
    "extra_us_per_step",
    "cpu_extra_us",
]
NULL_HEADERS = [
    "backbone",
    "batch",
    "steps",
    "cfg",
    "harness us",
    "bare us",
    "extra us (wall)",
    "extra us / steps",
    "extra us (CPU)",
]


class NullDigits(torch.nn.Module):
    """Stands in for the digits network: returns its input, so only the loop around it is timed."""

    def forward(self, x, t, y):
        return x


def null_rows(bb, prompts, batches, steps, reps, target_s) -> list[dict]:
    """Absolute cost of the code around the network: both paths with a network that does nothing."""
    rows = []
    model = NullDigits()
    for batch in batches:
        _, _, cond, noise = inputs(bb, prompts, batch)
        for w in dict.fromkeys((1.0, float(bb.default_teacher_guidance))):
            for n in steps:
                a, b = make_pair(
                    "digits", bb, model, noise, cond, flow.uniform_schedule(n, bb.shift), w
                )
                ta, tb = bu.interleaved(a, b, reps, bu.calibrate([a, b], target_s))
                s = bu.summarize(ta, tb)
                rows.append(
                    {
                        "what": "null model",
                        "backbone": "digits",
                        "batch": batch,
                        "steps": n,
                        "guidance": w,
                        "harness_us": 1e3 * s["harness_ms"],
                        "bare_us": 1e3 * s["bare_ms"],
                        "extra_us": 1e3 * (s["harness_ms"] - s["bare_ms"]),
                        "extra_us_per_step": 1e3 * (s["harness_ms"] - s["bare_ms"]) / n,
                        "cpu_extra_us": 1e3 * (s["harness_cpu_ms"] - s["bare_cpu_ms"]),
                    }
                )
    return rows


def profile(spec: str) -> None:
    """cProfile both paths of one configuration (Python-level: where the extra calls go)."""
    import cProfile
    import pstats

    name, batch, n, w = spec.split(":")
    loaded, note = load(name)
    if loaded is None:
        raise SystemExit(note)
    bb, model, prompts = loaded
    _, _, cond, noise = inputs(bb, prompts, int(batch))
    a, b = make_pair(
        name, bb, model, noise, cond, flow.uniform_schedule(int(n), bb.shift), float(w)
    )
    reps = bu.calibrate([a, b], 0.5)
    for label, fn in (("harness", a), ("bare", b)):
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(reps):
            fn()
        pr.disable()
        print(f"\n### {label}: {reps} calls")
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
