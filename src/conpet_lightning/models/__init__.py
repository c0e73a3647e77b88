"""Backbones, LoRA (upstream ``peft``) and the mask-position encoder (marker mapping lives in ``data.markers``).

Names are imported lazily so that importing one submodule does not pay for importing ``peft``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "BACKBONES": "backbone",
    "LoadedBackbone": "backbone",
    "load_backbone": "backbone",
    "default_target_modules": "pet",
    "make_lora_config": "pet",
    "count_parameters": "pet",
    "MaskEncoder": "encoder",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
