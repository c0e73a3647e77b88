"""Where the project's own files are: the one home of the project root (data, experiments, callbacks, caches)."""

from __future__ import annotations

from pathlib import Path

#: The source checkout this package runs from (``src/conpet_lightning`` two levels down).
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def in_project(path: str | Path) -> Path:
    """``path`` as given when it exists or is absolute, else the same relative path under the project root.

    This lets defaults such as ``data`` work from any working directory of a source checkout.
    """
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    inside = PROJECT_ROOT / path
    return inside if inside.exists() else path


def is_checkout(folder: Path = PROJECT_ROOT) -> bool:
    """True when ``folder`` is a source checkout of the project (it has ``setup.cfg`` and the package)."""
    return (folder / "setup.cfg").is_file() and (folder / "src" / "conpet_lightning").is_dir()
