"""Training state as plain tensors: capture, restore, save and load checkpoints.

A checkpoint holds only tensors, dicts, lists, tuples, numbers, strings and
None, so `torch.load(..., weights_only=True)` can read it. The random number
generators' states are converted to tensors and lists for that reason.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from torch import nn

from taxonomy.errors import DssmError
from taxonomy.writing import write_bytes_atomically

CHECKPOINT_FORMAT = 1


class CheckpointError(DssmError):
    """A checkpoint file that is missing, unreadable or written by another format version."""


def capture_parameters(model: nn.Module) -> dict[str, Any]:
    """Copy the module's state and every parameter in Pyro's param store.

    Param-store values are the unconstrained tensors, keyed by their Pyro
    names; parameters registered with `pyro.module` appear in both parts.
    """
    store = pyro.get_param_store()
    return {
        "module": {name: value.detach().clone() for name, value in model.state_dict().items()},
        "param_store": {name: value.detach().clone()
                        for name, value in store.named_parameters()},
    }


def restore_parameters(model: nn.Module, saved: dict[str, Any]) -> None:
    """Copy saved values into the module and the param store in place.

    Copying in place keeps every tensor's identity, so the optimizer, the
    param store and `pyro.module` registrations still refer to the same
    tensors. Parameters missing from the param store must be created first
    (see `initialize_parameters`).
    """
    model.load_state_dict(saved["module"])

    store = pyro.get_param_store()
    current = dict(store.named_parameters())
    missing = sorted(set(saved["param_store"]) - set(current))
    if missing:
        raise KeyError(f"parameters {missing} are in the checkpoint but not in Pyro's param "
                       f"store; run the model and guide once before restoring")
    with torch.no_grad():
        for name, value in saved["param_store"].items():
            current[name].copy_(value)


def initialize_parameters(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> None:
    """Run the guide and the model once so that every `pyro.param` and `pyro.module` exists.

    Distribution validation is off because the values do not matter here: the
    saved or first-step values replace them.
    """
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block():
        guide_trace = poutine.trace(model.guide).get_trace(x, mask)
        poutine.replay(model.model, trace=guide_trace)(x, mask)


def copy_optimizer_state(state: dict[str, Any], lr: float | None = None) -> dict[str, Any]:
    """Deep-copy `PyroOptim.get_state()`, optionally setting every learning rate to `lr`.

    The copy matters because optimizer state dicts refer to the live moment
    tensors, which the next step changes.
    """
    copied = copy.deepcopy(state)
    if lr is not None:
        for optimizer_state in copied.values():
            for group in optimizer_state["param_groups"]:
                group["lr"] = lr
    return copied


def capture_rng_states(batch_generator: torch.Generator) -> dict[str, Any]:
    """Capture the states of torch's, numpy's and Python's generators and of the batch order."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal_state, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal_state": list(internal_state),
                   "gauss_next": gauss_next},
        "batches": batch_generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any], batch_generator: torch.Generator) -> None:
    """Set every generator captured by `capture_rng_states` back to its saved state."""
    torch.set_rng_state(states["torch"].cpu())
    saved = states["numpy"]
    np.random.set_state((saved["bit_generator"], saved["keys"].cpu().numpy().astype(np.uint32),
                         saved["position"], saved["has_gauss"], saved["cached_gaussian"]))
    saved = states["python"]
    random.setstate((saved["version"], tuple(saved["internal_state"]), saved["gauss_next"]))
    batch_generator.set_state(states["batches"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a reader sees the previous file or the new one."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, buffer)
    write_bytes_atomically(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, device: torch.device | str) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`, mapping its tensors to `device`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():
            # A damaged file can start like a pickle of another protocol, and
            # torch then warns about the protocol before the error below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as error:
        # torch's own message for a rejected pickle is advice about weights_only,
        # which does not apply to a damaged file.
        if isinstance(error, pickle.UnpicklingError):
            reason = "unreadable pickle data"
        else:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise CheckpointError(f"cannot read checkpoint {path}: the file is damaged or is not a "
                              f"dssm checkpoint ({reason}); restore it from a copy or train "
                              f"the run again") from error

    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
        raise CheckpointError(f"{path} has checkpoint format {found!r}, but this version reads "
                              f"format {CHECKPOINT_FORMAT}; train the run again")
    return checkpoint
