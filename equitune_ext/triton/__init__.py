"""Triton backend (placeholder until the kernels land)."""
import torch


def is_available(device) -> bool:
    return False


def require(device) -> None:
    raise RuntimeError("backend 'triton' is not available")
