"""Continual methods (LightningModules), registered by name."""

from conpet_lightning.methods import (  # noqa: F401  (registers the methods)
    dynamic,
    shared,
    static,  # noqa: F401  (registers emr, eaemr, crl, ewc, lwf)
)
