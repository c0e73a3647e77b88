"""conpet-lightning: continual parameter-efficient tuning (ConPET) of language models on PyTorch Lightning."""

__version__ = "0.1.0"
