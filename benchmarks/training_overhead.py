"""Does the training core add cost? ``Trainer.step`` versus a hand-written loop, per method.

Harness (A): ``Trainer.step`` on prepared batches (each a fresh ``Batch`` over pre-drawn
labels and noise), with the method's digits defaults from ``resolve(cls, "digits")`` at
batch 128: registry-built method, per-group optimizer specs, loss dicts, finiteness check,
warm-up, clipping, EMA, logs.

Bare (B): the same iteration written out by hand for each method, mirroring its maths: the
same network calls (teacher, student, fake score, target) in the same order, the same AdamW
optimizers (same lr, betas, weight decay, linear warm-up), the same gradient clipping, the
same EMA / merge updates, and the same random draws from generators cloned from the
trainer's, so both sides run the same schedules (CDM's random step count, DMD2's backward
simulation depth) and their parameters agree after a block (checked before timing; on
torch 2.14 CPU they are bit-identical). No
registry, no dicts of loss terms, no finiteness checks, no logs.

One sample = a block of ``--block`` iterations (default 10: two full cycles of the 1:5
update ratios of cdm and dmd2), both sides at the same iteration numbers; samples are taken
interleaved (ABBA). Also timed, as its own row: ``Trainer.next_batch`` against drawing the
same labels and noise by hand; and an A/A control (the last method's bare loop against an
identical copy of itself), whose distance from 1 is the machine's noise floor.

    python benchmarks/training_overhead.py                  # cdm, dmd, dmd2, cd
    python benchmarks/training_overhead.py --methods cdm --reps 10 --threads 2

Prints a markdown table and writes results/benchmarks/training_overhead.csv. Target (DESIGN
section 9): ratio of medians <= 1.05.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from cdmbench import flow  # noqa: E402
from cdmbench.backbones import get_backbone  # noqa: E402
from cdmbench.backbones.digits import NULL_CLASS, NUM_CLASSES  # noqa: E402
from cdmbench.config import resolve  # noqa: E402
from cdmbench.registry import METHODS  # noqa: E402
from cdmbench.training.core import Trainer  # noqa: E402
from cdmbench.training.method import Batch  # noqa: E402

TARGET = 1.05
LO, HI = flow.SIGMA_MIN, flow.SIGMA_MAX


# ----------------------------------------------------------------------- bare loops
def b4(s: torch.Tensor) -> torch.Tensor:
    return s.view(-1, 1, 1, 1)


class Bare:
    """State a hand-written loop would hold: model copies, AdamW per model, generators."""

    def __init__(self, tr: Trainer) -> None:
        self.T = tr.teacher  # frozen: shared
        self.S = copy.deepcopy(tr.student)
        self.E = copy.deepcopy(tr.ema)
        self.Sp = list(self.S.parameters())
        self.Sd = [p.detach() for p in self.Sp]
        self.Ep = list(self.E.parameters())
        self.g = torch.Generator()
        self.g.set_state(tr.g.get_state())
        self.gs = torch.Generator()
        self.gs.set_state(tr.g_shared.get_state())
        self.it = 0
        self.k_student = 0
        self.ema_cap = tr.config.ema_cap
        spec = tr.specs["student"]
        self.opt_S = torch.optim.AdamW(
            self.Sp, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay
        )
        self.S_lr, self.S_warm, self.S_clip = spec.lr, spec.warmup, spec.clip
        if "fake" in tr.models:
            self.Fk = copy.deepcopy(tr.models["fake"])
            self.Fp = list(self.Fk.parameters())
            spec = tr.specs["fake"]
            self.opt_F = torch.optim.AdamW(
                self.Fp, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay
            )
            self.F_lr, self.F_warm, self.F_clip = spec.lr, spec.warmup, spec.clip
            self.k_fake = 0

    # the pieces every loop shares
    @staticmethod
    def warm(lr: float, k: int, warmup: int) -> float:
        return lr * min(1.0, (k + 1) / warmup) if warmup > 0 else lr

    @staticmethod
    def _step(loss, opt, params, clip, lr) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.step()

    def step_student(self, loss) -> None:
        k = self.k_student
        self._step(loss, self.opt_S, self.Sp, self.S_clip, self.warm(self.S_lr, k, self.S_warm))
        decay = min((1 + k) / (10 + k), self.ema_cap)
        with torch.no_grad():
            torch._foreach_lerp_(self.Ep, self.Sd, 1.0 - decay)
        self.k_student += 1

    def step_fake(self, loss) -> None:
        k = self.k_fake
        self._step(loss, self.opt_F, self.Fp, self.F_clip, self.warm(self.F_lr, k, self.F_warm))
        self.k_fake += 1

    def rand(self, n):
        return torch.rand(n, generator=self.g)

    def randn(self, shape):
        return torch.randn(shape, generator=self.g)

    def fm_fake(self, x0, y):
        """Flow-matching MSE of the fake score on x0 (tau clamped, fresh noise)."""
        tau = self.rand(len(x0)).clamp(LO, HI)
        eps = self.randn(x0.shape)
        xt = (1 - b4(tau)) * x0 + b4(tau) * eps
        return F.mse_loss(self.Fk(xt, 1000.0 * tau, y), eps - x0)

    def x0_real(self, x, s, y, w):
        """Teacher x0 at (x, s), CFG as one batched call when w != 1."""
        if w == 1.0:
            return x - b4(s) * self.T(x, 1000.0 * s, y)
        null = torch.full_like(y, NULL_CLASS)
        v_u, v_c = self.T(
            torch.cat([x, x]), 1000.0 * torch.cat([s, s]), torch.cat([null, y])
        ).chunk(2)
        return x - b4(s) * (v_u + w * (v_c - v_u))

    def block(self, data, n: int) -> None:
        for k in range(n):
            y, noise = data[(self.it + k) % len(data)]
            self.iteration(y, noise)
        self.it += n


class BareCDM(Bare):
    def __init__(self, tr: Trainer) -> None:
        super().__init__(tr)
        self.c = tr.method.config
        self.shift = tr.backbone.shift

    def dm_target(self, x0s, tau, y):
        with torch.no_grad():
            sg = x0s.detach()
            x_tau = (1 - b4(tau)) * sg + b4(tau) * self.randn(sg.shape)
            real = x_tau - b4(tau) * self.T(x_tau, 1000.0 * tau, y)
            fake = x_tau - b4(tau) * self.Fk(x_tau, 1000.0 * tau, y)
            nrm = (real - sg).abs().flatten(1).mean(1).clamp_min(self.c.norm_floor)
            return sg + (real - fake) / b4(nrm)

    def iteration(self, y, noise) -> None:
        c, b = self.c, len(y)
        assert (
            c.schedule == "random" and c.cfg_aug_scale == 0 and c.ontraj and c.offtraj
        )  # digits defaults
        with torch.no_grad():  # backward simulation on the random schedule, student at CFG 1
            n = int(torch.randint(1, c.n_max + 1, (1,), generator=self.gs).item())
            inner = c.inner_lo + (c.inner_hi - c.inner_lo) * torch.rand(
                n - 1, generator=self.gs, dtype=torch.float64
            )
            sig = torch.cat(
                [torch.ones(1, dtype=torch.float64), torch.sort(inner, descending=True).values]
            )
            sig = self.shift * sig / (1 + (self.shift - 1) * sig)
            sig = torch.cat([sig.float(), torch.zeros(1)])
            x, xs, vs = noise, [], []
            for j in range(n):
                v = self.S(x, 1000.0 * sig[j].expand(b), y)
                xs.append(x)
                vs.append(v)
                if j + 1 < n:
                    x = x + (sig[j + 1] - sig[j]) * v
            idx = torch.randint(0, n, (b,), generator=self.g)
            rows = torch.arange(b)
            xt, v, s = torch.stack(xs)[idx, rows], torch.stack(vs)[idx, rows], sig[idx]
            x0 = xt - b4(s) * v
        # fake score: flow matching on the simulated x0, then merge the student into it
        self.step_fake(self.fm_fake(x0, y))
        with torch.no_grad():
            torch._foreach_lerp_(self.Fp, self.Sd, c.merge)
        if self.it % c.update_ratio == 0:  # student: on- and off-trajectory distribution matching
            x0s = xt - b4(s) * self.S(xt, 1000.0 * s, y)
            tau = self.rand(b).clamp(LO, HI)
            loss = F.mse_loss(x0s, self.dm_target(x0s, tau, y))
            sp = self.rand(b).clamp(LO, HI)
            x_off = xt + b4(sp - s) * v
            x0_off = x_off - b4(sp) * self.S(x_off, 1000.0 * sp, y)
            tau = self.rand(b).clamp(LO, HI)
            loss = loss + F.mse_loss(x0_off, self.dm_target(x0_off, tau, y))
            self.step_student(loss)

    def block(self, data, n):  # iteration() reads self.it, so advance it per iteration
        for _ in range(n):
            y, noise = data[self.it % len(data)]
            self.iteration(y, noise)
            self.it += 1


class BareDMD(Bare):
    def __init__(self, tr: Trainer) -> None:
        super().__init__(tr)
        self.c = tr.method.config
        pn, pc, pt = tr.method.pairs
        self.pairs = (pn, pc.tensors["label"], pt)

    def dm_loss(self, x0, y, w):
        with torch.no_grad():
            sg = x0.detach()
            tau = self.rand(len(x0)).clamp(LO, HI)
            x_tau = (1 - b4(tau)) * sg + b4(tau) * self.randn(sg.shape)
            real = self.x0_real(x_tau, tau, y, w)
            fake = x_tau - b4(tau) * self.Fk(x_tau, 1000.0 * tau, y)
            nrm = (real - sg).abs().flatten(1).mean(1).clamp_min(self.c.norm_floor)
            target = sg - (fake - real) / b4(nrm)
        return 0.5 * F.mse_loss(x0, target)

    def iteration(self, y, noise) -> None:
        c, b = self.c, len(y)
        t1 = torch.full((b,), 1000.0)
        x0 = noise - self.S(noise, t1, y)  # one-step generator, x0 = eps - v(eps, 1)
        loss = self.dm_loss(x0, y, c.real_guidance)
        pn, py, pt = self.pairs
        idx = torch.randint(0, len(pn), (c.reg_batch or b,), generator=self.g)
        loss = loss + c.reg_weight * F.mse_loss(pn[idx] - self.S(pn[idx], t1, py[idx]), pt[idx])
        self.step_student(loss)
        self.step_fake(self.fm_fake(x0.detach(), y))


class BareDMD2(BareDMD):
    def __init__(self, tr: Trainer) -> None:
        Bare.__init__(self, tr)
        self.c = tr.method.config
        self.sig = flow.explicit_schedule(self.c.train_sigmas, tr.backbone.shift)[:-1]

    def iteration(self, y, noise) -> None:
        c, b = self.c, len(y)
        k = int(torch.randint(0, len(self.sig), (1,), generator=self.gs).item())
        with torch.no_grad():  # backward simulation: k student steps with re-noising
            x = noise
            for j in range(k):
                s = torch.full((b,), self.sig[j])
                x0 = x - b4(s) * self.S(x, 1000.0 * s, y)
                x = (1 - self.sig[j + 1]) * x0 + self.sig[j + 1] * self.randn(x.shape)
            s = torch.full((b,), self.sig[k])
            x0 = x - b4(s) * self.S(x, 1000.0 * s, y)
        self.step_fake(self.fm_fake(x0, y))
        if self.it % c.update_ratio == 0:
            x0 = x - b4(s) * self.S(x, 1000.0 * s, y)
            self.step_student(self.dm_loss(x0, y, c.real_guidance))

    block = BareCDM.block


class BareCD(Bare):
    def __init__(self, tr: Trainer) -> None:
        super().__init__(tr)
        m = tr.method
        self.c, self.grid, self.w = m.config, m.grid, m.w
        self.x_all, self.y_all = m.data[0], m.data[1].tensors["label"]
        self.ends = torch.tensor([*self.c.edges[1:], self.c.grid])
        self.TG = copy.deepcopy(tr.models["target"])
        self.TGp = list(self.TG.parameters())

    def iteration(self, y_unused, noise) -> None:
        c, b = self.c, len(noise)
        pick = torch.randint(0, len(self.x_all), (b,), generator=self.g)
        x0, y = self.x_all[pick], self.y_all[pick]
        n = torch.randint(0, c.grid, (b,), generator=self.g)
        e = self.ends[torch.searchsorted(self.ends, n, right=True)]
        s_n, s_n1, s_e = self.grid[n], self.grid[n + 1], self.grid[e]
        x_n = (1 - b4(s_n)) * x0 + b4(s_n) * noise
        with torch.no_grad():
            x_n1 = x_n + b4(s_n1 - s_n) * self.v_cfg(x_n, s_n, y)
            v_t = self.TG(x_n1, 1000.0 * s_n1, y)
            target = torch.where(b4(n + 1 == e), x_n1, x_n1 + b4(s_e - s_n1) * v_t)
        pred = x_n + b4(s_e - s_n) * self.S(x_n, 1000.0 * s_n, y)
        cc = c.huber_c
        self.step_student((torch.sqrt((pred - target) ** 2 + cc * cc) - cc).mean())
        with torch.no_grad():
            torch._foreach_lerp_(self.TGp, self.Sd, 1.0 - c.target_ema)

    def v_cfg(self, x, s, y):
        """Teacher velocity with CFG w, one batched call."""
        if self.w == 1.0:
            return self.T(x, 1000.0 * s, y)
        null = torch.full_like(y, NULL_CLASS)
        v_u, v_c = self.T(
            torch.cat([x, x]), 1000.0 * torch.cat([s, s]), torch.cat([null, y])
        ).chunk(2)
        return v_u + self.w * (v_c - v_u)


BARE = {"cdm": BareCDM, "dmd": BareDMD, "dmd2": BareDMD2, "cd": BareCD}


# --------------------------------------------------------------------------------- main
@torch.no_grad()
def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--methods", default="cdm,dmd,dmd2,cd")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--block", type=int, default=10, help="iterations per sample")
    ap.add_argument("--reps", type=int, default=20, help="samples per side (interleaved)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-aa", action="store_true", help="skip the A/A control row")
    ap.add_argument("--csv", default="results/benchmarks/training_overhead.csv")
    args = ap.parse_args()
    bu.setup_threads(args.threads)
    info = bu.machine_info(args.threads)
    print(bu.describe(info), flush=True)
    bb = get_backbone("digits")
    g = torch.Generator().manual_seed(1234)  # the prepared batches (not the trainers' generators)
    data = [
        (
            torch.randint(0, NUM_CLASSES, (args.batch,), generator=g),
            torch.randn((args.batch, *bb.latent_shape), generator=g),
        )
        for _ in range(args.block)
    ]
    rows = []
    tmp = tempfile.TemporaryDirectory(prefix="cdmbench-train-overhead-")
    tr = None
    for name in args.methods.split(","):
        cls = METHODS.get(name)
        tc, mc = resolve(cls, "digits", batch=args.batch)
        tr = Trainer(bb, cls(mc), tc, Path(tmp.name) / name)
        bare = BARE[name](tr)
        batches = [(bb.encode_labels(y), noise) for y, noise in data]

        def harness(tr=tr, batches=batches):
            for _ in range(args.block):
                cond, noise = batches[tr.it % len(batches)]
                tr.step(Batch(cond, noise))

        def hand(bare=bare):
            bare.block(data, args.block)

        start = copy.deepcopy(tr.student)
        harness()
        hand()
        moved, diff = max_param_diff(tr.student, start), max_param_diff(tr.student, bare.S)
        del start
        if not moved > 0 or diff > 1e-6:
            raise SystemExit(
                f"{name}: after {args.block} iterations the student moved by {moved:.3g} and the bare "
                f"loop's differs from the trainer's by {diff:.3g}; it does not mirror the method"
            )
        ta, tb = bu.interleaved(harness, hand, args.reps, number=1, warmup=1)
        r = {
            "what": "Trainer.step x block",
            "method": name,
            "batch": args.batch,
            "block": args.block,
            "reps": args.reps,
            **bu.summarize(ta, tb),
            "student_moved": moved,
            "student_max_diff": diff,
        }
        r["per_iter_harness_ms"] = r["harness_ms"] / args.block
        r["per_iter_bare_ms"] = r["bare_ms"] / args.block
        r["ok"] = "yes" if r["ratio"] <= TARGET else "NO"
        rows.append(r)
        bu.print_row(r, COLS, HEADERS)

    if tr is not None and not args.no_aa:  # A/A control: two identical bare loops, the noise floor
        b1, b2 = BARE[name](tr), BARE[name](tr)
        ta, tb = bu.interleaved(
            lambda: b1.block(data, args.block),
            lambda: b2.block(data, args.block),
            args.reps,
            number=1,
            warmup=1,
        )
        r = {
            "what": "A/A control: bare vs bare",
            "method": name,
            "batch": args.batch,
            "block": args.block,
            "reps": args.reps,
            **bu.summarize(ta, tb),
            "ok": "(noise)",
        }
        r["per_iter_harness_ms"], r["per_iter_bare_ms"] = (
            r["harness_ms"] / args.block,
            r["bare_ms"] / args.block,
        )
        rows.append(r)
        bu.print_row(r, COLS, HEADERS)

    if tr is not None:  # the batch the core draws each iteration in train(), its own row
        gb = torch.Generator().manual_seed(0)

        def hand_batch():
            torch.randint(0, NUM_CLASSES, (args.batch,), generator=gb)
            torch.randn((args.batch, *bb.latent_shape), generator=gb)

        number = bu.calibrate([tr.next_batch, hand_batch], 0.02)
        ta, tb = bu.interleaved(tr.next_batch, hand_batch, args.reps, number)
        r = {
            "what": "Trainer.next_batch vs randint+randn",
            "method": "(any)",
            "batch": args.batch,
            "block": 1,
            "reps": args.reps,
            **bu.summarize(ta, tb),
            "ok": "(info)",
        }
        r["per_iter_harness_ms"], r["per_iter_bare_ms"] = r["harness_ms"], r["bare_ms"]
        rows.append(r)
    tmp.cleanup()
    bu.finish(
        args.csv,
        rows,
        info,
        "Training overhead: Trainer.step vs a hand-written loop (digits)",
        bu.markdown(rows, COLS, HEADERS),
        f"ratio = median(harness) / median(bare) over {args.reps} interleaved blocks of {args.block} "
        f"iterations; target <= {TARGET}",
    )


COLS = [
    "what",
    "method",
    "batch",
    "per_iter_harness_ms",
    "per_iter_bare_ms",
    "ratio",
    "pair_ratio_q1",
    "pair_ratio_q3",
    "ratio_min",
    "cpu_ratio",
    "ok",
]
HEADERS = [
    "what",
    "method",
    "batch",
    "harness ms/iter",
    "bare ms/iter",
    "ratio (wall)",
    "pair q1",
    "pair q3",
    "ratio of mins",
    "ratio (CPU)",
    "wall <= 1.05",
]


if __name__ == "__main__":
    main()
