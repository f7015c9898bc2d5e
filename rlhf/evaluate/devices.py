"""Where evaluation runs, and which random generators an evaluation inside training must leave as they were."""

from __future__ import annotations

import torch

from rlhf.config import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """auto: the CUDA GPU when there is one, else the CPU; anything else as torch spells it (cpu, cuda, cuda:1)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: expected auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: this machine has no CUDA GPU (use --device cpu or auto)")
    return device


def devices_to_fork(device: torch.device | str) -> list[int]:
    """The CUDA devices torch.random.fork_rng must save and restore around sampling on `device`. Seeding
    (torch.manual_seed) reseeds the GPU's generator too, and sampling on the GPU draws from it, so forking the CPU's
    alone would leave training's GPU random state changed. Only the device in use: saving another GPU's state would
    start a CUDA context on it."""
    device = torch.device(device)
    if device.type != "cuda":
        return []
    return [torch.cuda.current_device() if device.index is None else device.index]
