"""Image features for FID-type metrics, in clean-fid's "clean" convention (Parmar et al. 2022).

    uint8 [N, C, H, W] -> RGB (grey replicated) -> per channel: float32 PIL image (mode F),
    bicubic resize to 299 x 299, clip to [0, 255] -> (x - 128) / 128 -> Inception pool3 (2048-d)

The network is clean-fid's TorchScript port of the TensorFlow FID Inception
(``inception-2015-12-05.pt``). As clean-fid does, it is downloaded on first use from clean-fid's
URL (``$CDMBENCH_INCEPTION_URL`` overrides it, e.g. for a mirror) to ``/tmp`` (``./`` on Windows),
or to ``$CDMBENCH_INCEPTION`` / the path given; offline (``HF_HUB_OFFLINE=1``) or with the host
unreachable, :meth:`InceptionFeatures.check` raises :class:`MissingWeightsError` naming the file,
its URL and where to put it.

The resize is clean-fid's own kernel: Pillow's two-pass separable bicubic (a = -0.5) on 'F'
images, horizontal pass first, each output a float64 sum over the filter taps in order,
rounded to float32 between the passes. Two implementations give bit-identical results:

- ``"pil"`` (default): Pillow itself, one call per channel as clean-fid does, over a thread
  pool (Pillow releases the GIL while resampling); grey images are resized once, not three
  times. On CPU this is the fastest exact path we measured: a vectorised float64 version in
  numpy or torch is memory-bound and 3-10x slower than Pillow's C loop on a CPU.
- ``"torch"``: the same arithmetic vectorised over the batch in float64 (taps gathered and
  accumulated in Pillow's order, separate multiply and add so no FMA changes the rounding,
  passes in Pillow's order: Pillow >= 13 resizes vertically first when the height shrinks
  by more than twice what the width does, which a probe of the installed Pillow detects),
  for images that already live on a GPU.

Any other feature space plugs in through :class:`CallableFeatures` (a ``feature_fn`` taking
uint8 images to [N, D] features), e.g. a small randomly initialised network in tests.
"""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cdmbench.io import module_sha256

INCEPTION_FILE = "inception-2015-12-05.pt"
# cleanfid.downloads_helper.inception_url (a test checks that the two agree)
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
)
INCEPTION_ENV = "CDMBENCH_INCEPTION"
INCEPTION_URL_ENV = "CDMBENCH_INCEPTION_URL"  # a mirror of INCEPTION_URL (same file)
CLEAN_SIZE = (299, 299)  # (width, height), as clean-fid passes it to PIL
CLEAN_RESIZE = "PIL bicubic to 299x299 on float32 per channel, clip [0, 255] (clean-fid 'clean')"


# ------------------------------------------------------------------------------ weights
def cleanfid_inception_path() -> Path:
    """Where clean-fid itself looks for (and would download) the Inception weights."""
    folder = "./" if platform.system() == "Windows" else "/tmp"  # cleanfid.features
    return Path(folder) / INCEPTION_FILE


def inception_path(path: str | os.PathLike | None = None) -> Path:
    """The weights file to use: ``path``, else $CDMBENCH_INCEPTION, else clean-fid's location.

    A folder (argument or variable) means ``folder/inception-2015-12-05.pt``.
    """
    given = path if path is not None else os.environ.get(INCEPTION_ENV) or None
    if given is None:
        return cleanfid_inception_path()
    p = Path(given).expanduser()
    return p / INCEPTION_FILE if p.is_dir() else p


def inception_url() -> str:
    """Where the Inception weights are downloaded from: $CDMBENCH_INCEPTION_URL, else
    clean-fid's URL."""
    return os.environ.get(INCEPTION_URL_ENV) or INCEPTION_URL


def missing_inception_message(path: Path) -> str:
    """How to put a missing Inception file in place by hand (one line)."""
    return (
        f"fetch {INCEPTION_FILE} from {inception_url()} and save it as {path} (or set "
        f"{INCEPTION_ENV}=/path/to/{INCEPTION_FILE})"
    )


def fetch_inception(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file (:func:`inception_path`), downloaded there on first use."""
    from cdmbench.weights import url_file

    dest = inception_path(path)
    return url_file(
        inception_url(),
        dest,
        what="clean-fid Inception weights",
        hint=missing_inception_message(dest),
    )


# ------------------------------------------------------------------------------ resize
def _bicubic(x: float) -> float:
    """Pillow's bicubic filter, a = -0.5 (Resample.c), in the same operation order."""
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@lru_cache(maxsize=64)
def pil_bicubic_taps(in_size: int, out_size: int) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """Pillow's ``precompute_coeffs`` for bicubic: per output pixel (first input, weights)."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ss = 1.0 / filterscale
    out = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C casts truncate toward zero
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = [_bicubic(((x + xmin) - center + 0.5) * ss) for x in range(xmax)]
        total = 0.0
        for w in ws:
            total += w
        if total != 0.0:
            ws = [w / total for w in ws]
        out.append((xmin, tuple(ws)))
    return tuple(out)


def _torch_pass(x: Tensor, in_size: int, out_size: int) -> Tensor:
    """One Pillow pass along the last dim of float32 ``x``: float64 tap sums -> float32."""
    taps = pil_bicubic_taps(in_size, out_size)
    ksize = max(len(w) for _, w in taps)
    idx = torch.tensor(
        [[min(x0 + t, in_size - 1) for t in range(ksize)] for x0, _ in taps], device=x.device
    )
    wts = torch.tensor(
        [list(w) + [0.0] * (ksize - len(w)) for _, w in taps], dtype=torch.float64, device=x.device
    )
    xd = x.to(torch.float64)
    acc = xd[..., idx[:, 0]] * wts[:, 0]
    for t in range(1, ksize):  # padded taps carry weight 0 and leave the sum unchanged
        acc = acc + xd[..., idx[:, t]] * wts[:, t]
    return acc.to(torch.float32)


def _resize_torch(x: Tensor, size: tuple[int, int], vertical_first: bool | None = None) -> Tensor:
    """Vectorised Pillow bicubic of float32 [N, C, H, W] to (width, height) ``size``."""
    (w_out, h_out), (h, w) = size, x.shape[-2:]
    if vertical_first is None:
        vertical_first = _vertical_first(h, w, h_out, w_out)

    def horizontal(t: Tensor) -> Tensor:
        return _torch_pass(t, w, w_out) if w != w_out else t  # Pillow skips a no-op pass

    def vertical(t: Tensor) -> Tensor:
        return _torch_pass(t.transpose(-1, -2), h, h_out).transpose(-1, -2) if h != h_out else t

    x = horizontal(vertical(x)) if vertical_first else vertical(horizontal(x))
    return x.contiguous()


def _vertical_first(h: int, w: int, h_out: int, w_out: int) -> bool:
    """Pillow's pass order: horizontal first, except (Pillow >= 13, python-pillow/Pillow#9549)
    when the height shrinks by more than twice what the width does."""
    rule = _pillow_order_rule()
    if rule is None:
        raise RuntimeError(
            "the torch resize backend does not reproduce this Pillow version's "
            "pass order; use resize backend 'pil'"
        )
    return rule and h > h_out and w != w_out and (h - h_out) > 2 * (w - w_out)


@lru_cache(maxsize=1)
def _pillow_order_rule() -> bool | None:
    """Whether the installed Pillow uses the vertical-first rule (True), always resizes
    horizontally first (False), or neither (None): probed once on a small image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (48, 12)).astype(np.float32)  # rows shrink 38, columns 2
    ref = np.asarray(Image.fromarray(x).resize((10, 10), resample=Image.Resampling.BICUBIC))
    t = torch.from_numpy(x)[None, None]
    for rule in (True, False):
        out = _resize_torch(t, (10, 10), vertical_first=rule)[0, 0].numpy()
        if np.array_equal(out, ref):
            return rule
    return None


def _resize_pil(x: np.ndarray, size: tuple[int, int], threads: int) -> np.ndarray:
    """clean-fid's per-channel Pillow resize of uint8 [N, C, H, W]; float32 [N, C, h, w]."""
    from PIL import Image

    n, c = x.shape[:2]
    out = np.empty((n, c, size[1], size[0]), np.float32)

    def one(i: int) -> None:
        for j in range(c):
            img = Image.fromarray(x[i, j].astype(np.float32))  # mode 'F', as clean-fid
            out[i, j] = np.asarray(img.resize(size, resample=Image.Resampling.BICUBIC))

    if threads > 1 and n > 1:
        list(thread_pool("resize", threads).map(one, range(n)))
    else:
        for i in range(n):
            one(i)
    return out


@cache
def thread_pool(role: str, threads: int) -> ThreadPoolExecutor:
    """A process-wide thread pool per role and size, started once (idle between batches).

    Roles keep separate pools: the prefetch thread waits on the resize pool, which must not
    be its own.
    """
    return ThreadPoolExecutor(threads, thread_name_prefix=f"cdmbench-{role}")


def default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def clean_resize(
    images: Tensor,
    size: tuple[int, int] = CLEAN_SIZE,
    backend: str = "pil",
    threads: int | None = None,
) -> Tensor:
    """clean-fid's "clean" resize of uint8 [N, C, H, W] -> float32 RGB [N, 3, h, w] in [0, 255]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected uint8 [N, 1 or 3, H, W] images, got {images.dtype} {tuple(images.shape)}"
        )
    if backend == "pil":
        x = _resize_pil(images.cpu().numpy(), size, threads or default_threads())
        out = torch.from_numpy(x).to(images.device)
    elif backend == "torch":
        out = _resize_torch(images.to(torch.float32), size)
    else:
        raise ValueError(f"unknown resize backend '{backend}' (pil, torch)")
    out = out.clamp_(0, 255)
    # grey -> RGB replicates the channel (PIL convert('RGB')); each copy resizes identically
    return out.expand(-1, 3, -1, -1).contiguous() if out.shape[1] == 1 else out


# ------------------------------------------------------------------------------ extractors
class ImageFeatures:
    """Base: uint8 images [N, C, H, W] -> float32 features [N, D], in batches."""

    id: str = "features"
    mode: str = "custom"
    resize: str = "none"

    def __init__(self, batch_size: int = 64, device: str | torch.device | None = None) -> None:
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None

    def check(self) -> None:
        """Raise MissingWeightsError if the extractor's weights are not on this machine."""

    def config(self) -> dict[str, Any]:
        return {"features": self.id, "mode": self.mode, "resize": self.resize}

    def to(self, device: str | torch.device) -> ImageFeatures:
        self.device = torch.device(device)
        return self

    def embed(self, images: Tensor) -> Tensor:
        """Features of one batch."""
        return self.forward(self.prepare(images))

    def prepare(self, images: Tensor) -> Any:
        """Host-side work on one batch (resizing); runs ahead of :meth:`forward` in a thread."""
        return images

    def forward(self, prepared: Any) -> Tensor:
        """The network on one prepared batch."""
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        """Features of all images, batch by batch; batch k + 1 is prepared (resized) while the
        network runs on batch k, so the resize stays off the critical path on a GPU."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"expected uint8 [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}"
            )
        starts = range(0, images.shape[0], self.batch_size)
        if type(self).prepare is ImageFeatures.prepare or len(starts) < 2:  # nothing to overlap
            feats = [self.embed(images[s : s + self.batch_size]) for s in starts]
        else:
            feats = []
            ahead = thread_pool("prefetch", 1)  # prepares the next batch while the network runs
            nxt = ahead.submit(self.prepare, images[: self.batch_size])
            for s in starts:
                cur = nxt.result()
                if s + self.batch_size < images.shape[0]:
                    nxt = ahead.submit(
                        self.prepare, images[s + self.batch_size : s + 2 * self.batch_size]
                    )
                feats.append(self.forward(cur))
        out = [torch.as_tensor(f).detach().float().reshape(f.shape[0], -1).cpu() for f in feats]
        return torch.cat(out) if out else torch.empty(0, 0)


def module_digest(module: nn.Module) -> str:
    """A content hash of a module's parameters and buffers (names, shapes, values)."""
    return module_sha256(module, salt=type(module).__qualname__)[:16]


class CallableFeatures(ImageFeatures):
    """Any ``feature_fn`` taking uint8 images [B, C, H, W] to features [B, D].

    ``feature_id`` keys the cached reference statistics: give one for anything but an
    ``nn.Module`` (a module's id is a hash of its weights; a function's is only its name).
    """

    def __init__(
        self,
        feature_fn: Callable[[Tensor], Tensor | np.ndarray],
        feature_id: str | None = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__(batch_size)
        self.fn = feature_fn
        if feature_id is None:  # content-keyed for modules, so cached statistics stay valid
            if isinstance(feature_fn, nn.Module):
                feature_id = f"{type(feature_fn).__name__}:{module_digest(feature_fn)}"
            else:
                feature_id = f"{feature_fn.__module__}.{getattr(feature_fn, '__qualname__', '?')}"
        self.id = feature_id

    def embed(self, images: Tensor) -> Tensor:
        return torch.as_tensor(self.fn(images))


class InceptionFeatures(ImageFeatures):
    """2048-d pool3 features of clean-fid's TorchScript Inception, "clean" resize (Parmar 2022)."""

    mode = "clean"
    resize = CLEAN_RESIZE

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        model: nn.Module | None = None,
        resize_backend: str = "pil",
        threads: int | None = None,
    ) -> None:
        """``model``: a network of the architecture ([B, 3, 299, 299] in [-1, 1] -> [B, 2048])
        in place of the TorchScript file, e.g. randomly initialised for tests."""
        super().__init__(batch_size, device)
        self._path = path
        self.model = model
        self.resize_backend = resize_backend
        self.threads = threads
        self._ready: tuple[int, torch.device] | None = None  # (model, device) _net last prepared
        if model is None:
            self.id = "clean-fid/inception-2015-12-05 pool3 (2048-d)"
        else:
            self.id = f"{type(model).__name__}:{module_digest(model)} (user model)"

    @property
    def path(self) -> Path:
        return inception_path(self._path)

    def check(self) -> None:
        """Download the weights file on first use; MissingWeightsError where that fails."""
        if self.model is None:
            fetch_inception(self._path)

    def config(self) -> dict[str, Any]:
        # the file's location is deliberately left out: moving it changes no result
        return {**super().config(), "url": INCEPTION_URL if self.model is None else "user model"}

    def _net(self, device: torch.device) -> nn.Module:
        """The network in eval mode on ``device``: loaded and moved once, not per batch."""
        if self.model is None:
            self.check()
            with torch.inference_mode(False), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
                base = torch.jit.load(str(self.path), map_location=device).eval()
            self.model = base.layers  # clean-fid's InceptionV3W calls base.layers directly
        if self._ready != (id(self.model), device):
            self.model = self.model.eval().to(device)
            self._ready = (id(self.model), device)
        return self.model

    def prepare(self, images: Tensor) -> Tensor:
        device = self.device or torch.device("cpu")
        backend = self.resize_backend
        return clean_resize(
            images.to(device) if backend == "torch" else images,
            backend=backend,
            threads=self.threads,
        )

    def forward(self, prepared: Tensor) -> Tensor:
        device = self.device or torch.device("cpu")
        net = self._net(device)
        x = prepared.to(device)
        x = (x - 128) / 128  # clean-fid: x1 = x - 128; x2 = x1 / 128
        return net(x).reshape(x.shape[0], 2048)


def as_features(
    features: ImageFeatures | Callable[[Tensor], Any] | None = None,
    *,
    feature_fn: Callable[[Tensor], Any] | None = None,
    feature_id: str | None = None,
    inception_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> ImageFeatures:
    """An extractor from what a metric was given: an extractor, a callable, or Inception."""
    if features is not None and feature_fn is not None:
        raise ValueError("give either features or feature_fn, not both")
    fn = feature_fn if feature_fn is not None else features
    if isinstance(fn, ImageFeatures):
        return fn.to(device) if device is not None else fn
    if fn is not None:
        return CallableFeatures(fn, feature_id, batch_size)
    return InceptionFeatures(inception_path, batch_size=batch_size, device=device)


__all__ = [
    "CLEAN_RESIZE",
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "CallableFeatures",
    "ImageFeatures",
    "InceptionFeatures",
    "as_features",
    "clean_resize",
    "cleanfid_inception_path",
    "fetch_inception",
    "inception_path",
    "inception_url",
    "module_digest",
    "pil_bicubic_taps",
]
