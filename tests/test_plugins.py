"""A third-party method, written against the documented interface only and installed through
a ``cdmbench.methods`` entry point, trains from the command line like a built-in one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from cdmbench.backbones import get_backbone

# The plugin's whole source: public names only (the method interface, the shared losses and
# the flow-matching conventions), as a package outside cdmbench would write it.
PLUGIN = '''
"""One-step distribution matching in one screen: the fake score learns the student's
samples by flow matching, the student follows the normalised score difference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cdmbench import flow
from cdmbench.losses import dm_loss, fm_loss
from cdmbench.training.method import Batch, Core, Method, OptimSpec


@dataclass
class OneStepConfig:
    lr: float = 1e-3
    fake_lr: float = 1e-3


@dataclass
class Sample:
    """The student's one-step sample of this iteration, shared by both groups."""

    x0: Tensor  # no grad


class OneStep(Method[Sample]):
    """One-step distribution matching (a plugin example)."""

    name = "onestep"
    Config = OneStepConfig

    def build(self, core: Core) -> dict[str, nn.Module]:
        return {"fake": core.backbone.clone(core.student).requires_grad_(True).train()}

    def optim_groups(self, core: Core) -> dict[str, OptimSpec]:
        return {"fake": OptimSpec("fake", lr=self.config.fake_lr, warmup=0),
                "student": OptimSpec("student", lr=self.config.lr, warmup=0)}

    def groups_to_update(self, it: int) -> list[str]:
        return ["fake", "student"]

    @torch.no_grad()
    def prepare(self, it: int, batch: Batch, core: Core) -> Sample:
        ones = torch.ones(len(batch), device=core.device)
        return Sample(core.backbone.x0(core.student, batch.noise, ones, batch.cond))

    def losses(self, group: str, it: int, batch: Batch, state: Sample, core: Core
               ) -> dict[str, Tensor]:
        bb, fake = core.backbone, core.models["fake"]
        tau = flow.clamp_sigma(core.rand(len(batch)))
        eps = core.randn(*batch.noise.shape)
        if group == "fake":
            return {"fm": fm_loss(bb, fake, state.x0, batch.cond, tau, eps)}
        ones = torch.ones(len(batch), device=core.device)
        x0 = bb.x0(core.student, batch.noise, ones, batch.cond)
        return {"dm": dm_loss(bb, core.teacher, fake, x0, batch.cond, tau, eps)}
'''


def _install(root: Path) -> None:
    """A package and the dist-info of an installed distribution declaring the entry point."""
    pkg = root / "cdmb_onestep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "method.py").write_text(textwrap.dedent(PLUGIN))
    dist = root / "cdmb_onestep-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cdmb-onestep\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[cdmbench.methods]\nonestep = cdmb_onestep.method:OneStep\n"
    )


def test_entry_point_method_trains_through_the_cli(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _install(site)
    # a fresh process, as after `pip install`: the registry finds the entry point on its own
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    code = "import sys; from cdmbench.cli import main; main(sys.argv[1:])"
    args = ["list", "methods"]
    listed = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert "onestep" in listed.stdout
    args = ["train", "onestep", "--iters", "6", "--batch", "16", "--out", "runs"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    (run_dir,) = (tmp_path / "runs" / "digits").glob("onestep-*")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["method"] == "onestep" and info["iters"] == 6
    assert info["updates"] == {"fake": 6, "student": 6}
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert {"fake/fm", "student/dm"} <= set(log[-1])
    student = load_file(str(run_dir / "student.safetensors"))
    teacher = get_backbone("digits").load_teacher().state_dict()
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[k], teacher[k].cpu()) for k in student)  # it trained
