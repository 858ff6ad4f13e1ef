"""Render the LLMService spec reference (docs/spec-reference.md) from the pydantic model itself.

Generated, never hand-edited: a test fails when the committed file drifts from the model.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tokenfleet.spec import LLMService

HEADER = """# LLMService spec reference

Generated from `tokenfleet/spec.py` by `tokenfleet spec docs`; do not edit by hand.
`apiVersion: tokenfleet.dev/v1alpha1`, `kind: LLMService`. Field names are camelCase.
Validate a file with `tokenfleet validate -f service.yaml`; the JSON schema is `tokenfleet spec schema`.
"""


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    for prefix in ("typing.", "tokenfleet.spec."):
        text = text.replace(prefix, "")
    return text.replace("NoneType", "null").replace("|", "\\|")


def _default(field: FieldInfo) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        return "required"
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return "`" + json.dumps([v.model_dump(by_alias=True, exclude_none=True) for v in value]) + "`"
    return "`" + json.dumps(value) + "`"


def _constraints(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for attr, symbol in (
            ("ge", "≥"),
            ("gt", ">"),
            ("le", "≤"),
            ("lt", "<"),
            ("min_length", "min len"),
            ("max_length", "max len"),
        ):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            parts.append(f"pattern `{pattern}`")
    return ", ".join(parts)


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()):
        found += _nested_models(arg)
    return found


def render(root: type[BaseModel] = LLMService) -> str:
    sections: list[str] = [HEADER]
    queue: list[tuple[str, type[BaseModel]]] = [("", root)]
    seen: set[type[BaseModel]] = set()
    while queue:
        path, model = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        title = path or model.__name__
        doc = (model.__doc__ or "").strip().splitlines()
        lines = [f"## `{title}` ({model.__name__})", ""]
        if doc:
            lines += [doc[0], ""]
        lines += ["| field | type | default | constraints | description |", "|---|---|---|---|---|"]
        for name, field in model.model_fields.items():
            alias = field.alias or name
            description = (field.description or "").replace("|", "\\|")
            row = (
                f"| `{alias}` | {_type_name(field.annotation)} | {_default(field)} | "
                f"{_constraints(field)} | {description} |"
            )
            lines.append(row)
            for nested in _nested_models(field.annotation):
                queue.append((f"{path}.{alias}" if path else alias, nested))
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)
