"""The one place that decides where torch runs: CUDA when available, else CPU; RIB_EDGE_DEVICE overrides."""

from __future__ import annotations

import os

import torch

ENV_VAR = "RIB_EDGE_DEVICE"


def pick_device(prefer: str | None = None) -> torch.device:
    """The torch device to use: env RIB_EDGE_DEVICE, else ``prefer``, else 'auto' (CUDA if present, else CPU).

    Asking for CUDA where there is none is an error rather than a silent CPU run, so a GPU job
    never quietly takes hours on CPU.
    """
    choice = (os.environ.get(ENV_VAR) or prefer or "auto").strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError as err:
        raise ValueError(f"unknown device {choice!r} (use auto, cpu, cuda or cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {choice!r} requested but CUDA is not available")
    return device
