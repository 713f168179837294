"""Runnable examples: ``python -m equitune_ext.examples.image``."""
