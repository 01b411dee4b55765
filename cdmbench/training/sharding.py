"""FSDP2 sharding of the training core's models, and full (unsharded) state to and from it.

When: ``TrainConfig.shard`` is "none" (every process holds every model; the core averages
gradients itself), "fsdp2" (``torch.distributed.fsdp.fully_shard``) or "auto": FSDP2 when
``accelerate launch`` was given an FSDP configuration (it sets ``ACCELERATE_USE_FSDP`` and
``FSDP_VERSION``), else none. The core implements FSDP2 only; an accelerate configuration
asking for FSDP version 1 is refused with a one-line error rather than silently run with the
other version or replicated, since the user's memory plan depends on which one runs. One
process has nothing to shard across: "fsdp2" then warns and runs unsharded. Of accelerate's
other FSDP settings none is read: the wrapped blocks come from the backbone
(``Backbone.fsdp_wrap_classes``) and the rest keeps FSDP2's defaults.

What: every wrap-class submodule, then the root, of every model with parameters (student,
EMA, a method's auxiliary models, the frozen teacher), after the method built its clones
and before the optimizers exist, so the optimizers hold the sharded parameters.

Precision: no ``MixedPrecisionPolicy``. The sd3 and longcat forwards already run float32
master weights under bf16 autocast on GPU (chosen from the parameters' dtype, which a
sharded model still reports as float32), and the teacher is stored in the backbone's bf16.
A bf16 ``param_dtype`` would add a second cast of the same matmuls, round the weights that
autocast keeps in float32 (norms), and reduce gradients in bf16; without it gradients are
reduced in float32 as the replicated run's all-reduce does, so a sharded run reproduces a
replicated one up to rounding. The price is float32 all-gathers of the trainable models.

Gradients: FSDP2 reduce-scatters them with the mean over ranks (``ReduceOp.AVG`` for
float32 gradients), the mean the replicated run takes, so the core skips its own
all-reduce for sharded models. A model run several times before one backward (as the
methods do) gets the gradients of every use reduced and summed, as replicated.

Collectives: every forward of a sharded model all-gathers, so every rank must run the
same forwards in the same order. The methods already draw such choices (schedule lengths,
simulation steps) from the generator shared by all ranks; work done in ``Method.build``
(teacher samples) runs before sharding; a model run on one rank only (the export's sample
grid) needs a whole copy (``Trainer.unsharded``).

State: checkpoints of several processes are sharded (each rank writes its own shards
through ``torch.distributed.checkpoint``, see :mod:`cdmbench.training.checkpoint`). The
full-state helpers here serve the whole model a single process needs (export, sampling) and
the single-file checkpoint format, which a sharded run also reads. Models go through
``torch.distributed.checkpoint.state_dict`` (full state, gathered to rank 0's CPU).
Optimizer state is gathered tensor by tensor in the optimizer's own format (integer
parameter ids) instead of ``get/set_optimizer_state_dict``: those initialise an optimizer
that has not stepped yet by taking a zero-gradient step, which gives every parameter an
Adam step count and so changes the bias correction of the next real step after a resume;
they also key the state by parameter name, unlike a replicated run's checkpoint.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cdmbench.errors import UserError

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

SHARD_MODES = ("none", "fsdp2", "auto")
_TRUE = ("1", "true", "yes", "y", "on", "t")  # accelerate's str_to_bool


def check_shard_mode(mode: str) -> None:
    """A one-line :class:`UserError` for a value outside :data:`SHARD_MODES`."""
    if mode not in SHARD_MODES:
        raise UserError(
            f"bad value '{mode}' for 'train.shard': use none, fsdp2 or auto "
            "(auto: FSDP2 under `accelerate launch --use_fsdp --fsdp_version 2`)"
        )


def resolve_shard(mode: str, world: int, env: Mapping[str, str] | None = None) -> bool:
    """Whether this run shards its models with FSDP2 (see the module docstring)."""
    check_shard_mode(mode)
    env = os.environ if env is None else env
    if world == 1:
        if mode == "fsdp2":
            warnings.warn(
                "train.shard=fsdp2 in a single process: nothing to shard across, training unsharded",
                stacklevel=2,
            )
        return False
    if mode != "auto":
        return mode == "fsdp2"
    if env.get("ACCELERATE_USE_FSDP", "false").lower() not in _TRUE:
        return False
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise UserError(
            f"accelerate is configured for FSDP version {version}, cdmbench shards with FSDP2 only: "
            "launch with --fsdp_version 2, or set train.shard=none to replicate the models"
        )
    return True


def device_mesh(device: torch.device, world: int):
    """The 1-D mesh of every process, on this process's device."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def shard_model(model: nn.Module, wrap_classes: tuple[type, ...], mesh) -> bool:
    """``fully_shard`` each submodule of a wrap class (innermost first, as FSDP2 requires),
    then the root, in place; False, leaving it untouched, when it has no parameters.

    The root too reshards after every forward (FSDP2 keeps a root's parameters gathered
    until the next backward by default): models run forwards without a backward (the
    teacher, the student's no-grad simulation) and between them the core reads the
    parameters as shards (EMA, merges, optimizer, checkpoints).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return True
    if next(model.parameters(), None) is None:
        return False
    if wrap_classes:
        for sub in reversed(list(model.modules())):
            if sub is not model and isinstance(sub, wrap_classes):
                fully_shard(sub, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return True


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor, without importing ``torch.distributed.tensor`` (seconds
    at start-up) in runs that never shard: no DTensor exists before something imported it."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (every parameter is, once the root is)."""
    return is_dtensor(next(model.parameters(), None))


def local(t: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor (sharing its storage), else the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def full(t: Tensor) -> Tensor:
    """The whole of a sharded tensor (a collective: every rank must call it), else the tensor."""
    return t.full_tensor() if is_dtensor(t) else t


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict; of a sharded model, the full CPU state on rank 0 and an empty
    dict on the others (a collective)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full state dict into the model; into a sharded one, a collective where the state
    is present on every rank and each keeps its shards."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(optim: torch.optim.Optimizer) -> dict[str, Any]:
    """``optim.state_dict()`` with every sharded tensor gathered whole to rank 0's CPU.

    Over sharded parameters a collective: every rank gathers the same tensors in the same
    (sorted parameter id) order; ranks other than 0 drop them as they come and get the state
    without tensors.
    """
    sd = optim.state_dict()
    if not any(is_dtensor(p) for group in optim.param_groups for p in group["params"]):
        return sd
    keep = dist.get_rank() == 0
    state: dict[int, dict[str, Any]] = {}
    for i in sorted(sd["state"]):
        entry = {}
        for k, v in sd["state"][i].items():
            if is_dtensor(v):
                v = v.full_tensor()
                v = v.cpu() if keep else None
            entry[k] = v
        state[i] = entry
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(optim: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a full optimizer state dict into an optimizer; over sharded parameters (the state
    present on every rank) each rank keeps its own slice, cut locally (no communication)."""
    params = [p for group in optim.param_groups for p in group["params"]]
    state = {}
    for i, entry in sd["state"].items():
        p = params[int(i)]
        if is_dtensor(p):
            entry = {
                k: shard_like(v, p)
                if isinstance(v, Tensor) and v.shape == p.shape and v.dim() > 0
                else v
                for k, v in entry.items()
            }
        state[i] = entry
    optim.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def shard_like(whole: Tensor, like: DTensor) -> DTensor:
    """This rank's slice of ``whole``, placed as ``like`` (FSDP2's Shard(0) on a 1-D mesh).

    The slice is copied, so the whole tensor is neither kept alive by a view nor moved to
    the device in full (``distribute_tensor`` would do both).
    """
    from torch.distributed.tensor import DTensor, Shard

    if like.placements != (Shard(0),):
        raise ValueError(f"expected FSDP2's Shard(0) placement, got {like.placements}")
    mesh = like.device_mesh
    n, world, rank = whole.shape[0], mesh.size(), mesh.get_local_rank()
    rows = -(-n // world)  # torch.chunk's split, as FSDP2 and DTensor use
    piece = whole[min(rank * rows, n) : min((rank + 1) * rows, n)].to(
        like.device, like.dtype, copy=True
    )
    if piece.shape != like.to_local().shape:
        raise ValueError(
            f"shard of shape {tuple(piece.shape)} does not match the parameter's local "
            f"{tuple(like.to_local().shape)}"
        )
    return DTensor.from_local(
        piece, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )
