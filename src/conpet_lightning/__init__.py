"""conpet-lightning: continual parameter-efficient tuning (ConPET) of language models on PyTorch Lightning."""

from conpet_lightning.native_memory import cap_kernel_caches

__version__ = "0.1.0"

cap_kernel_caches()  # before the first CPU matmul of the process (native_memory says why)
