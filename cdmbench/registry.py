"""One generic registry for backbones, methods and metrics.

Entries are registered with a decorator, or lazily as ``"module:attr"`` strings so that
``cdmbench --help`` does not import torch-heavy modules. Third-party plugins register
through the entry-point group named after the registry (``cdmbench.methods`` ...).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions, transpositions."""
    d = [[max(i, j) if min(i, j) == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def suggest(name: str, candidates: list[str]) -> str | None:
    """The closest candidate (a swap of two letters counts as one edit), if close enough."""
    scored = sorted(
        (_edit_distance(name.lower(), c.lower()), abs(len(c) - len(name)), c) for c in candidates
    )
    if scored and scored[0][0] <= max(1, len(name) // 3):
        return scored[0][2]
    return None


class UnknownNameError(KeyError):
    """A user asked for a name no registry entry has; the message suggests the closest."""

    def __str__(self) -> str:  # KeyError quotes its message; a user error should not.
        return str(self.args[0])


@dataclass
class Entry:
    name: str
    target: Any  # the object, or "module:attr" until first use
    description: str = ""

    def load(self) -> Any:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self.target = obj
        return self.target


class Registry(Generic[T]):
    """Name -> plugin mapping with lazy entries, entry points and "did you mean" errors."""

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind  # "method", "backbone", "metric"
        self.group = group or f"cdmbench.{kind}s"
        self._entries: dict[str, Entry] = {}
        self._scanned = False

    def register(
        self, name: str, target: Any = None, *, description: str = ""
    ) -> Callable[[T], T] | None:
        """Register ``target`` under ``name``; without a target, return a decorator."""
        if target is not None:
            self._entries[name] = Entry(name, target, description)
            return None

        def deco(obj: T) -> T:
            self._entries[name] = Entry(name, obj, description)
            return obj

        return deco

    def _scan_entry_points(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._entries:
                self._entries[ep.name] = Entry(ep.name, ep.value, f"plugin from {ep.value}")

    def names(self) -> list[str]:
        self._scan_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._scan_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def entry(self, name: str) -> Entry:
        self._scan_entry_points()
        if name not in self._entries:
            close = suggest(name, list(self._entries))
            hint = f" — did you mean '{close}'?" if close else ""
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownNameError(f"unknown {self.kind} '{name}'{hint} (known: {known})")
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).load()

    def describe(self, name: str) -> str:
        e = self.entry(name)
        if e.description:
            return e.description
        doc = (getattr(e.load(), "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""


BACKBONES: Registry = Registry("backbone")
METHODS: Registry = Registry("method")
METRICS: Registry = Registry("metric")

# Built-ins are lazy so that the CLI starts without importing torch.
BACKBONES.register(
    "digits",
    "cdmbench.backbones.digits:Digits",
    description="8x8 handwritten digits (scikit-learn), class-conditional MLP teacher; CPU in minutes",
)
METHODS.register(
    "cdm",
    "cdmbench.methods.cdm:CDM",
    description="Continuous-Time Distribution Matching (arXiv 2605.06376)",
)
METHODS.register(
    "dmd",
    "cdmbench.methods.dmd:DMD",
    description="Distribution Matching Distillation, one step + regression (arXiv 2311.18828)",
)
METHODS.register(
    "dmd2",
    "cdmbench.methods.dmd2:DMD2",
    description="DMD2: two time-scale updates, multi-step backward simulation (arXiv 2405.14867)",
)
METHODS.register(
    "cd",
    "cdmbench.methods.cd:CD",
    description="Multiphase consistency distillation for flow matching (LCM/PCM style)",
)
METRICS.register(
    "latency",
    "cdmbench.metrics.latency:Latency",
    description="wall time per image (median, p90; end to end and denoiser only), ms",
)
METRICS.register(
    "fd_digits",
    "cdmbench.metrics.digits:DigitsFD",
    description="Fréchet distance in domain-classifier features to the real test "
    "split (backbones with a domain classifier: digits)",
)
METRICS.register(
    "prompt_acc",
    "cdmbench.metrics.digits:PromptAccuracy",
    description="share of samples the domain classifier assigns to the prompted class "
    "(backbones with a domain classifier: digits)",
)
METRICS.register(
    "clip_score",
    "cdmbench.metrics.clip_score:ClipScore",
    description="CLIP score, open_clip ViT-L-14/openai, torchmetrics convention (Hessel et al. 2021)",
)
METRICS.register(
    "image_reward",
    "cdmbench.metrics.image_reward:ImageRewardScore",
    description="ImageReward-v1.0 human-preference reward, image-reward package (Xu et al. 2023)",
)
METRICS.register(
    "fid",
    "cdmbench.metrics.fid:FID",
    description="FID, clean-fid 'clean' convention (Inception pool3, PIL bicubic "
    "299); reference statistics cached",
)
METRICS.register(
    "precision_recall",
    "cdmbench.metrics.prdc:PrecisionRecall",
    description="improved precision/recall, k-NN manifolds, k = 3 (Kynkäänniemi et al. 2019)",
)
METRICS.register(
    "class_recall",
    "cdmbench.metrics.coverage:ClassRecall",
    description="per-class improved recall (mode coverage): mean and worst class, in "
    "domain-classifier features (backbones with a domain classifier: digits)",
)
BACKBONES.register(
    "sd3",
    "cdmbench.backbones.sd3:SD3",
    description="Stable Diffusion 3 Medium through diffusers (arXiv 2403.03206); "
    "weights from the hub or $CDMBENCH_SD3",
)
BACKBONES.register(
    "tiny-sd3",
    "cdmbench.backbones.sd3:TinySD3",
    description="SD3's diffusers classes from tiny configs, random weights; offline, for tests",
)
BACKBONES.register(
    "longcat",
    "cdmbench.backbones.longcat:LongCat",
    description="LongCat-Image (arXiv:2512.07584) through diffusers; "
    "weights from the hub or $CDMBENCH_LONGCAT",
)
BACKBONES.register(
    "tiny-longcat",
    "cdmbench.backbones.longcat:TinyLongCat",
    description="LongCat-Image's diffusers classes from tiny configs, random weights; "
    "offline, for tests",
)
METRICS.register(
    "clip_score_cos",
    "cdmbench.metrics.clip_cos:ClipScoreCos",
    description="CLIP score as plain cosine, transformers CLIP ViT-L/14 (official CDM evaluation)",
)
METRICS.register(
    "pickscore",
    "cdmbench.metrics.pickscore:PickScore",
    description="PickScore-v1 reward, exp(logit_scale) x cosine (Kirstain et al. 2023)",
)
METRICS.register(
    "hpsv2",
    "cdmbench.metrics.hps:HPSv2",
    description="HPSv2.1 human-preference score, open_clip ViT-H-14 (Wu et al. 2023)",
)
METRICS.register(
    "aesthetic",
    "cdmbench.metrics.aesthetic:LaionAesthetic",
    description="LAION aesthetic predictor (MLP on CLIP ViT-L/14 image embeddings)",
)
METRICS.register(
    "intra_lpips",
    "cdmbench.metrics.diversity:IntraLPIPS",
    description="intra-prompt diversity: mean pairwise LPIPS-AlexNet (lpips package)",
)
METRICS.register(
    "vendi",
    "cdmbench.metrics.diversity:Vendi",
    description="intra-prompt diversity: Vendi score of LPIPS-AlexNet features (Friedman & Dieng 2023)",
)
