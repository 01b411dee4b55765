"""Where a training run's numbers and sample grids go.

``log.jsonl`` in the run directory always gets every logged record. ``train.log_to``
adds one tracker: ``tensorboard`` (the run's ``tb/`` folder, when the tensorboard package
is installed; silently none otherwise), ``wandb`` (Weights & Biases: project ``cdmbench``,
one W&B run per run directory, resumed with it; the package is required when asked for) or
``none``. Sample grids (``train.sample_every``) go to the tracker and to
``samples/it-<iteration>.png`` in the run directory, each a bounded PNG.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from torch import Tensor

from cdmbench.errors import UserError

TRACKERS = ("tensorboard", "wandb", "none")
WANDB_PROJECT = "cdmbench"
SAMPLE_CELL = 128  # pixels on a side of a cell of the periodic sample grids


def check_tracker(log_to: str) -> None:
    """A one-line error, before a run starts, when the tracker asked for is not installed."""
    if log_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError(
            "train.log_to=wandb needs the wandb package: pip install wandb (then `wandb login`, "
            "or WANDB_MODE=offline), or use train.log_to=tensorboard"
        )


class RunLogger:
    """The run's log: ``log.jsonl`` plus the tracker ``log_to`` names (see the module doc).

    Only the main process makes one; ``config`` is what the tracker records as the run's
    configuration (the run's identifying payload).
    """

    def __init__(
        self,
        run_dir: str | Path,
        log_to: str = "tensorboard",
        config: Any = None,
        resume_it: int = 0,
    ):
        if log_to not in TRACKERS:
            raise ValueError(f"unknown tracker '{log_to}' ({', '.join(TRACKERS)})")
        self.run_dir = Path(run_dir)
        self.log_to = log_to
        self.path = self.run_dir / "log.jsonl"
        self._rewind(resume_it)
        self.tb = None
        self.wandb = None
        if log_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.tb = SummaryWriter(str(self.run_dir / "tb"))
        elif log_to == "wandb":
            check_tracker(log_to)
            import wandb

            self.wandb = wandb.init(
                project=WANDB_PROJECT,
                name=f"{self.run_dir.parent.name}/{self.run_dir.name}",
                id=f"{self.run_dir.parent.name}-{self.run_dir.name}",
                resume="allow",
                dir=str(self.run_dir),
                config=config,
            )

    def _rewind(self, it: int) -> None:
        """Keep only the records up to iteration ``it`` (where training resumes): a process
        killed after its last checkpoint logged iterations that will run again, and may have
        left half a line."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("it"), int) and rec["it"] <= it:
                kept.append(line + "\n")
        text = "".join(kept)
        if text != self.path.read_text():
            from cdmbench.io import atomic_path

            with atomic_path(self.path) as tmp:
                tmp.write_text(text)

    def record(self, rec: dict[str, Any]) -> None:
        """Append ``rec`` (``it``, ``time`` and the loss terms) to log.jsonl and the tracker."""
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        it = rec["it"]
        values = {k: v for k, v in rec.items() if k not in ("it", "time")}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, it)
        if self.wandb is not None:
            self.wandb.log(values, step=it)

    def images(self, tag: str, grid: Tensor, it: int, nrow: int) -> Path:
        """Write [B, C, H, W] images in [0, 1] as ``samples/it-<it>.png`` (cells at most
        :data:`SAMPLE_CELL` pixels) and to the tracker; the PNG's path."""
        import numpy as np

        from cdmbench.generate import grid_image
        from cdmbench.io import atomic_path

        img = grid_image(grid, nrow, scale=4, max_cell=SAMPLE_CELL)
        path = self.run_dir / "samples" / f"it-{it:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
        arr = np.asarray(img.convert("RGB"))  # H, W, 3 uint8
        if self.tb is not None:
            self.tb.add_image(tag, arr, it, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(arr)}, step=it)
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


SAMPLE_PROMPTS = 8  # prompts of the periodic sample grids (the backbone's first test prompts)
SAMPLE_STEPS = (1, 4)  # their step counts, one grid row each
SAMPLE_SEED = 1000  # seed of prompt i is SAMPLE_SEED + i, as in the run's final grid


def periodic_samples(trainer: Any) -> tuple[Tensor, int] | None:
    """(images, columns) of the EMA student on the first test prompts at
    :data:`SAMPLE_STEPS`, on the main process (None elsewhere). A collective when the EMA
    is sharded. Seeded per sample and run with the global RNG restored, so sampling leaves
    the training draws as they were."""
    import torch

    from cdmbench.generate import generate

    ema = trainer.unsharded("ema")
    if trainer.rank != 0:
        return None
    bb = trainer.backbone
    prompts = list(bb.prompts("test"))[:SAMPLE_PROMPTS]
    seeds = [SAMPLE_SEED + i for i in range(len(prompts))]
    specs = []
    for n in SAMPLE_STEPS:
        try:
            specs.append(trainer.method.sampler(n, bb.shift))
        except UserError:  # a step count the method refuses (dmd with multistep="none")
            continue
    with torch.random.fork_rng(devices=[]):
        rows = [generate(bb, ema, prompts, seeds, spec) for spec in specs]
        images = bb.decode(torch.cat(rows))
    return images, len(prompts)
