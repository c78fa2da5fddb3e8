"""Which torch device a run trains on (``auto``, ``cpu``, ``cuda`` or ``cuda:N``)."""

from __future__ import annotations

import torch

from appliance.errors import InvalidRequestError


def pick_device(device: str) -> torch.device:
    """The device named by a run's ``device`` argument; ``auto`` is CUDA when available.

    Raises:
        InvalidRequestError: Not a CPU or CUDA device, or CUDA asked for without one.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}", param="device")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"`device` is {device!r} but no CUDA device is available", param="device")
    return chosen
