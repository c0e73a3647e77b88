"""What a user can set, from the command line: ``conpet config EXP`` and the experiment list of ``conpet run --help``.

Every option's one-line doc is the attribute docstring under its field in the options dataclass (the one home of its
default), read with ``ast``; nothing is repeated by hand.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import cache
from pathlib import Path
from typing import Any

from conpet_lightning.config import PROJECT_ROOT, RunConfig, experiment_names


def first_sentence(text: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    para = " ".join(text.strip().split("\n\n")[0].split())
    head, dot, _ = para.partition(". ")
    return head + "." if dot else para


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its bases: the first line of the string under each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, [*body[1:], None], strict=True):
            named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            if named and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[node.target.id] = first_sentence(str(after.value.value))
    return docs


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def _line(pad: str, name: str, value: Any, doc: str, default: Any) -> str:
    """One option: its value, then its doc and, when the value differs from it, its default."""
    note = doc if value == default else f"{doc} (default: {_fmt(default)})".strip()
    return f"{pad}{name}: {_fmt(value)}" + (f"  # {note}" if note else "")


def _lines(obj: Any, cls: type, indent: int) -> list[str]:
    """Every field of a dataclass instance (or of a dict holding its fields), nested sections indented."""
    docs = field_docs(cls)
    pad = "  " * indent
    out: list[str] = []
    for f in dataclasses.fields(cls):
        value = obj[f.name] if isinstance(obj, dict) else getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.append(f"{pad}{f.name}:")
            out += _lines(value, type(value), indent + 1)
        else:
            out.append(_line(pad, f.name, value, docs.get(f.name, ""), _default(f)))
    return out


def _first_line(obj: Any) -> str:
    return (inspect.getdoc(obj) or "").splitlines()[0] if inspect.getdoc(obj) else ""


def describe_config(cfg: RunConfig) -> str:
    """The resolved, validated configuration as commented YAML: each option with its doc and (if changed) default."""
    from conpet_lightning.registry import CALLBACKS, METHODS

    out: list[str] = []
    top_docs = field_docs(RunConfig)
    for f in dataclasses.fields(RunConfig):
        value = getattr(cfg, f.name)
        if f.name == "method":
            method_cls = METHODS.get(value["name"])
            out.append(f"method:  # {_first_line(method_cls)}")
            out += _lines(value, method_cls.options_cls, 1)
        elif f.name == "callbacks":
            out.append("callbacks:" + ("  {}" if not value else ""))
            for slot, entry in value.items():
                cb_cls = CALLBACKS.get(entry["name"])
                out.append(f"  {slot}:  # {_first_line(cb_cls)}")
                if cb_cls.options_cls is None:
                    out.append(f"    name: {entry['name']}")
                else:
                    out += _lines(entry, cb_cls.options_cls, 2)
        elif dataclasses.is_dataclass(value):
            out.append(f"{f.name}:" + (f"  # {_first_line(type(value))}" if _first_line(type(value)) else ""))
            out += _lines(value, type(value), 1)
        else:
            out.append(_line("", f.name, value, top_docs.get(f.name, ""), _default(f)))
    return "\n".join(out) + "\n"


def experiment_summaries(experiments_dir: Path | None = None) -> list[tuple[str, str]]:
    """(name, one-line description) of every experiment: the first sentence of its file's header comment."""
    folder = experiments_dir or PROJECT_ROOT / "experiments"
    out = []
    for name in experiment_names(folder):
        header = []
        for line in (folder / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("# ").strip())
        first = " ".join(header).split(". ")[0]
        out.append((name, first if len(first) <= 90 else first[:89] + "…"))
    return out
