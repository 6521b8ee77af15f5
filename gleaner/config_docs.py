"""docs/config.md, made from the schema: every key, its type, its default and its meaning.

The meaning of a field is the comment on its line in gleaner/config.py (or on the lines
just above it), the meaning of a section its class docstring's first paragraph; so the
reference cannot drift from the code. ``python -m gleaner.config_docs > docs/config.md``
writes it; a test fails when the file is stale.
"""

from __future__ import annotations

import ast
import inspect
import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from gleaner import config as config_module
from gleaner.config import GleanerConfig

HEADER = """# Configuration reference

Generated from the schema (`gleaner/config.py`) by `python -m gleaner.config_docs`; do not
edit by hand. A YAML file (`--config`) sets any of these keys; CLI flags override them.
Keys are dotted paths: `rate.endpoint.model` is `model` under `endpoint` under `rate`.
"""


def field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment on the field's line, or the lines above it."""
    source = inspect.getsource(config_module)
    lines = source.splitlines()
    found: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            end = lines[(item.end_lineno or item.lineno) - 1]
            comment = end.split("  # ", 1)[1].strip() if "  # " in end else ""
            above, row = [], item.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#"):
                above.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            text = " ".join(part for part in (" ".join(above), comment) if part)
            found[(node.name, item.target.id)] = text.removeprefix("noqa").strip()
    return found


def type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("NoneType", "None")


def default_text(field: Any) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    try:
        return json.dumps(value, default=str)
    except TypeError:
        return str(value)


def sub_model(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds (``X``, ``X | None``), else None."""
    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def rows(model: type[BaseModel], prefix: str, comments: dict[tuple[str, str], str],
         owners: dict[str, str]) -> list[str]:
    out: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = sub_model(field.annotation)
        meaning = comments.get((owners.get(name, model.__name__), name), "")
        if nested is not None:
            out += rows(nested, f"{key}.", comments, field_owners(nested))
            continue
        cell = meaning.replace("|", "\\|")
        out.append(f"| `{key}` | `{type_name(field.annotation)}` | "
                   f"`{default_text(field)}` | {cell} |")
    return out


def field_owners(model: type[BaseModel]) -> dict[str, str]:
    """Which class of the hierarchy declares each field (its comment lives there)."""
    owners: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        for name in getattr(cls, "__annotations__", {}):
            owners[name] = cls.__name__
    return owners


def render() -> str:
    comments = field_comments()
    parts = [HEADER]
    for name, field in GleanerConfig.model_fields.items():
        nested = sub_model(field.annotation)
        if nested is None:
            parts.append(f"\n## `{name}`\n\n| key | type | default | meaning |\n|---|---|---|---|\n"
                         f"| `{name}` | `{type_name(field.annotation)}` | "
                         f"`{default_text(field)}` | "
                         f"{comments.get(('GleanerConfig', name), '')} |\n")
            continue
        own = nested.__dict__.get("__doc__")  # a section's own docstring, never its base's
        doc = inspect.cleandoc(own).split("\n\n")[0].replace("\n", " ") if own else ""
        table = "\n".join(rows(nested, f"{name}.", comments, field_owners(nested)))
        parts.append(f"\n## `{name}`\n\n{doc}\n\n| key | type | default | meaning |\n"
                     f"|---|---|---|---|\n{table}\n")
    return "".join(parts)


if __name__ == "__main__":
    print(render(), end="")
