"""Every random stream of a process as plain tensors: captured into checkpoints, restored on resume."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch


def _generator_state(gen: Any) -> dict[str, Any]:
    if isinstance(gen, torch.Generator):
        return {"kind": "torch", "state": gen.get_state()}
    if isinstance(gen, np.random.Generator):
        # bit-generator states hold 128-bit integers: JSON keeps them exact
        return {"kind": "numpy", "state": json.dumps(gen.bit_generator.state)}
    raise TypeError(f"cannot checkpoint a generator of type {type(gen).__name__}")


def _set_generator_state(gen: Any, state: dict[str, Any]) -> None:
    if isinstance(gen, torch.Generator) and state["kind"] == "torch":
        gen.set_state(state["state"])
    elif isinstance(gen, np.random.Generator) and state["kind"] == "numpy":
        gen.bit_generator.state = json.loads(state["state"])
    else:
        raise TypeError(f"generator {type(gen).__name__} does not match saved kind {state['kind']}")


def capture_rng_state(generators: dict[str, Any] | None = None) -> dict[str, Any]:
    """Python ``random``, NumPy global, torch CPU, CUDA (if available) and registered generators."""
    version, internal, gauss_next = random.getstate()
    _name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: _generator_state(g) for k, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, Any] | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if torch.cuda.is_available() and cuda_states:
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # fewer/more visible GPUs than when saved: restore the current device only
            idx = torch.cuda.current_device()
            torch.cuda.set_rng_state(cuda_states[min(idx, len(cuda_states) - 1)])
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"checkpoint has no state for registered generator {name!r}")
        _set_generator_state(gen, saved[name])


@contextlib.contextmanager
def preserved_rng(generators: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Run a block (validation, sampling) without disturbing the training RNG streams."""
    state = capture_rng_state(dict(generators or {}))
    try:
        yield
    finally:
        restore_rng_state(state, dict(generators or {}))
