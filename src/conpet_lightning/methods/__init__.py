"""Continual methods (LightningModules), registered by name; ``registry`` imports every module here."""
