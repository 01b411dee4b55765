"""`digits`: the embedded default backbone, real 8x8 handwritten digits on a laptop CPU.

Data: ``sklearn.datasets.load_digits`` (1,797 grey 8x8 images, 10 classes, values 0..16),
scaled to [-1, 1]; the latent is the image itself, shape [1, 8, 8]. Split: within each
class, in file order, every fourth image (position % 4 == 3) is held out as the test split
(445 images); the other 1,352 form the train split. The rule depends on nothing random.
The validation split ("val", 451 images: per class, position % 4 == 1) is a fixed third of
the train split, disjoint from test: `cdmbench sweep` scores its trials on it so tuning never
sees the test images. The teacher and the classifier were trained on the whole train split,
val included (and CD draws its real data from it), so val is held out from tuning's test,
not from training.

Prompts are "a handwritten digit seven"; the empty prompt is the null class (label 10).
Teacher: a class-conditional flow-matching MLP (:class:`VelocityMLP`); classifier: a small
CNN (:class:`DigitClassifier`) whose penultimate features define the domain Fréchet
distance and whose predictions define prompt accuracy. Both ship as safetensors in
``cdmbench/backbones/assets`` and are reproduced by ``cdmbench teacher --backbone digits``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdmbench import flow
from cdmbench.backbones.base import Backbone, BackboneSettings, Cond
from cdmbench.prompts_io import Prompt
from cdmbench.settings import setting

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the unconditional input
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ASSETS = "cdmbench.backbones.assets"
TEACHER_FILE = "digits_teacher.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"


# ------------------------------------------------------------------------------- data
@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # [N, 1, 8, 8] in [-1, 1]
    return x, d.target.astype(np.int64)


SPLITS = ("train", "val", "test", "all")


def split_indices(split: str) -> np.ndarray:
    """Indices of the fixed split: per class, in file order, position % 4 == 3 is test, the
    rest is train; val is the part of train at position % 4 == 1."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' ({', '.join(SPLITS)})")
    _, y = _load()
    if split == "all":
        return np.arange(len(y))
    pos = np.zeros(len(y), dtype=np.int64)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        pos[idx] = np.arange(len(idx))
    if split == "val":
        return np.flatnonzero(pos % 4 == 1)
    test = pos % 4 == 3
    return np.flatnonzero(test if split == "test" else ~test)


def load_split(split: str) -> tuple[Tensor, Tensor]:
    """(images in [-1, 1] as [N, 1, 8, 8], labels [N]) for 'train', 'val', 'test' or 'all'."""
    x, y = _load()
    idx = split_indices(split)
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


# ------------------------------------------------------------------------------ networks
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the network timestep (1000 * s), as in DDPM/DiT."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@dataclass
class VelocityMLPConfig:
    pixels: int = 64  # 8 x 8 grey
    width: int = 256  # hidden width of the residual stream
    depth: int = 4  # residual blocks
    mult: int = 2  # block expansion
    temb: int = 128  # sinusoidal timestep features
    num_classes: int = NUM_CLASSES  # + 1 null class for CFG


class _Block(nn.Module):
    """Pre-norm residual MLP block with adaLN shift/scale from the (time, class) embedding."""

    def __init__(self, width: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(width, 2 * width)
        self.fc1 = nn.Linear(width, mult * width)
        self.fc2 = nn.Linear(mult * width, width)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.mod(c).chunk(2, dim=-1)
        z = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(F.silu(self.fc1(z)))


class VelocityMLP(nn.Module):
    """Class-conditional velocity network v(x, t, y) for 8x8 digits (t = 1000 s)."""

    def __init__(self, cfg: VelocityMLPConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or VelocityMLPConfig()
        self.inp = nn.Linear(cfg.pixels, cfg.width)
        self.t_mlp = nn.Sequential(
            nn.Linear(cfg.temb, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width)
        )
        self.y_emb = nn.Embedding(cfg.num_classes + 1, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.mult) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, cfg.pixels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        c = F.silu(self.t_mlp(timestep_embedding(t, self.cfg.temb)) + self.y_emb(y))
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, c)
        return self.out(F.silu(self.out_norm(h))).view_as(x)


class DigitClassifier(nn.Module):
    """Three-conv CNN; ``features`` (penultimate, 32-d) feed the domain Fréchet distance."""

    feature_dim = 32

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.SiLU(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features of images in [-1, 1], shape [B, 1, 8, 8]."""
        return F.silu(self.fc(self.conv(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.features(x)))


# ------------------------------------------------------------------------------ backbone
def _asset_path(name: str) -> Path:
    return Path(str(resources.files(ASSETS).joinpath(name)))


def _load_safetensors(module: nn.Module, path: str | Path, what: str) -> nn.Module:
    from cdmbench.io import load_state

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} weights not found at {path}; run `cdmbench teacher --backbone digits` to rebuild them"
        )
    fix = "give the safetensors file `cdmbench teacher --backbone digits` writes"
    return load_state(module, path, f"{what} weights", fix).eval().requires_grad_(False)


@dataclass(frozen=True)
class DigitsSettings(BackboneSettings):
    """Digits has no model options; its settings are the teacher's sampler and eval's defaults."""

    teacher_steps: int = 50
    teacher_guidance: float = 2.0  # measured: FD is lowest near w = 2 at 50 steps
    eval_batch: int = setting(256, hashed=False)  # 64-value latents: 256 per call
    eval_samples: int = setting(200, hashed=False)  # 2,000 samples: FD's noise floor is low
    eval_samples_quick: int = setting(50, hashed=False)  # CI budget
    eval_metrics: tuple[str, ...] = setting(
        ("fd_digits", "prompt_acc", "precision_recall", "class_recall", "latency"), hashed=False
    )
    eval_prompts: str = setting("digits", hashed=False)  # the ten class prompts


class Digits(Backbone):
    """8x8 handwritten digits (scikit-learn), class-conditional MLP teacher."""

    name = "digits"
    Settings = DigitsSettings
    latent_shape = (1, 8, 8)
    shift = 1.0  # 64-d data: no resolution shift
    trains_teacher = True

    def teacher_id(self, weights: str | None = None) -> str:
        """The content hash of the teacher file (the shipped one by default)."""
        return super().teacher_id(str(_asset_path(TEACHER_FILE)) if weights is None else weights)

    def train_teacher_assets(
        self,
        out_dir: str | Path,
        *,
        seed: int = 0,
        iters: int | None = None,
        epochs: int | None = None,
        progress=None,
    ) -> str:
        """Train the classifier and the teacher (:func:`build_assets`) into ``out_dir``."""
        teacher = TeacherConfig(seed=seed, **({} if iters is None else {"iters": iters}))
        clf = ClassifierConfig(seed=seed, **({} if epochs is None else {"epochs": epochs}))
        acc = build_assets(out_dir, teacher, clf, progress)["classifier_test_accuracy"]
        return f"classifier test accuracy {acc:.4f}; weights in {out_dir}"

    def load_teacher(self, weights: str | None = None) -> nn.Module:
        net = VelocityMLP()
        return _load_safetensors(net, weights or _asset_path(TEACHER_FILE), "digits teacher").to(
            self.device
        )

    def load_classifier(self, weights: str | None = None) -> DigitClassifier:
        net = DigitClassifier()
        return _load_safetensors(
            net, weights or _asset_path(CLASSIFIER_FILE), "digits classifier"
        ).to(self.device)

    def prompts(self, split: str = "train") -> list[Prompt]:
        return [
            Prompt(id=f"digit-{c}", text=f"a handwritten digit {NAMES[c]}", label=c)
            for c in range(NUM_CLASSES)
        ]

    def prompt_label(self, prompt: Prompt) -> int | None:
        """The class a prompt names ('... seven' or '... 7'; '' is the null class), or None."""
        try:
            return _label_of(prompt)
        except ValueError:
            return None

    def encode(self, prompts: Sequence[Prompt]) -> Cond:
        labels = torch.tensor([_label_of(p) for p in prompts], dtype=torch.long, device=self.device)
        return Cond({"label": labels}, {"label": torch.tensor([NULL_CLASS], device=self.device)})

    def encode_labels(self, labels: Tensor) -> Cond:
        return Cond(
            {"label": labels.to(self.device)},
            {"label": torch.tensor([NULL_CLASS], device=self.device)},
        )

    def forward(self, model: nn.Module, x: Tensor, s: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return model(x, flow.timestep(s), cond["label"])

    def feature_width(self, model: nn.Module) -> int:
        return model.cfg.width

    def features(self, model: nn.Module, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        """The residual stream after the first half of the blocks (the MLP's middle, where a
        UNet has its bottleneck), [B, width]."""
        return self._hooked(model.blocks[len(model.blocks) // 2 - 1], model, x, s, cond).float()

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents.float() + 1) / 2).clamp_(0, 1)

    def real_images(self, split: str = "test") -> Tensor:
        return (load_split(split)[0] + 1) / 2

    def domain_classifier(self) -> DigitClassifier:
        return self.load_classifier()

    def real_latents(self, split: str = "train") -> tuple[Tensor, Tensor]:
        return load_split(split)


def _label_of(p: Prompt) -> int:
    if p.label is not None:
        return p.label
    text = p.text.strip().lower()
    if not text:
        return NULL_CLASS
    for c, name in enumerate(NAMES):
        if text.endswith(name) or text.endswith(str(c)):
            return c
    raise ValueError(f"prompt '{p.text}' names no digit; use e.g. 'a handwritten digit seven'")


# ------------------------------------------------------------------------------ training
@dataclass
class TeacherConfig:
    seed: int = 0
    iters: int = 6000  # ~4 min on 2 CPU cores
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    label_dropout: float = 0.1  # share of null-class labels, so CFG works
    ema: float = 0.999
    t_mean: float = 0.0  # logit-normal t (SD3): sigmoid(N(mean, std))
    t_std: float = 1.0


@dataclass
class ClassifierConfig:
    seed: int = 0
    epochs: int = 60
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4


def train_teacher(cfg: TeacherConfig, progress=None) -> VelocityMLP:
    """Rectified-flow training (Liu et al. 2022; SD3 logit-normal t) on the train split."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = load_split("train")
    net = VelocityMLP()
    ema = VelocityMLP()
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.iters, pct_start=0.05
    )
    for it in range(cfg.iters):
        idx = torch.randint(0, len(x_all), (cfg.batch,), generator=g)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(cfg.batch, generator=g) < cfg.label_dropout] = NULL_CLASS
        eps = torch.randn(x0.shape, generator=g)
        s = flow.sample_logit_normal(cfg.batch, cfg.t_mean, cfg.t_std, generator=g)
        xt = flow.add_noise(x0, eps, s)
        loss = F.mse_loss(net(xt, flow.timestep(s), y), flow.velocity_target(x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - cfg.ema)
        if progress is not None:
            progress(it, float(loss))
    return ema.eval()


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """One-pixel random translations: the classifier must not rely on exact registration."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    return pad[:, :, dy : dy + 8, dx : dx + 8]


def train_classifier(cfg: ClassifierConfig, progress=None) -> DigitClassifier:
    """Cross-entropy training on the train split, with one-pixel shifts."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = load_split("train")
    net = DigitClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_all) / cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch
    )
    step = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x_all), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch : (i + 1) * cfg.batch]
            loss = F.cross_entropy(net(_augment(x_all[idx], g)), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:
                progress(step, float(loss))
            step += 1
    return net.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(net: DigitClassifier, split: str = "test") -> float:
    x, y = load_split(split)
    return float((net(x).argmax(-1) == y).float().mean())


def save_module(module: nn.Module, path: str | Path, meta: dict | None = None) -> None:
    """Write a module's weights as safetensors (atomically), plus a JSON sidecar."""
    from safetensors.torch import save_file

    from cdmbench.io import atomic_path, atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    if meta is not None:
        atomic_write_json(path.with_suffix(".json"), meta)


def build_assets(
    out_dir: str | Path, teacher: TeacherConfig, classifier: ClassifierConfig, progress=None
) -> dict:
    """Train the classifier and the teacher, write both as safetensors with JSON sidecars."""
    out_dir = Path(out_dir)

    def report(what, total):
        return (lambda it, loss: progress(what, it, total, loss)) if progress else None

    clf = train_classifier(
        classifier,
        report(
            "classifier",
            classifier.epochs * math.ceil(len(split_indices("train")) / classifier.batch),
        ),
    )
    acc = classifier_accuracy(clf, "test")
    save_module(
        clf,
        out_dir / CLASSIFIER_FILE,
        {
            "config": asdict(classifier),
            "test_accuracy": acc,
            "torch": torch.__version__,
            "split": "train (per class, position % 4 != 3)",
        },
    )
    net = train_teacher(teacher, report("teacher", teacher.iters))
    save_module(
        net,
        out_dir / TEACHER_FILE,
        {
            "config": asdict(teacher),
            "model": asdict(net.cfg),
            "torch": torch.__version__,
            "split": "train (per class, position % 4 != 3)",
        },
    )
    return {"classifier_test_accuracy": acc}
