"""Continual methods (LightningModules), registered by name."""

from conpet_lightning.methods import dynamic, shared  # noqa: F401  (registers the methods)
