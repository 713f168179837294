"""Datasets generated in code (no downloads): ``scan`` (Lake & Baroni 2018)."""
from . import scan

__all__ = ["scan"]
