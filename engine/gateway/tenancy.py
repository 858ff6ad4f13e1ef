"""API keys -> tenants, and which class a request may run in. Pure except `load_keys`."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tokenfleet.engine.sla_contract import decide_class
from tokenfleet.spec import SchedulerSpec, SLOClass, Tenant

KEYS_ENV = "TOKENFLEET_API_KEYS"  # "key1=tenant-a,key2=tenant-b"


class KeyFileError(ValueError):
    pass


def parse_keys(text: str) -> dict[str, str]:
    """A YAML/JSON mapping `{key: tenant}` or a list of `{key:, tenant:}` entries.

    A mounted Kubernetes Secret (apiKeysSecret) is read through the same path: the operator
    mounts its `keys.yaml` entry as a file.
    """
    try:
        document = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        # Not the parser's text: it quotes the offending line, a key. The position is enough.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise KeyFileError(f"not YAML/JSON{where}") from None
    if isinstance(document, list):
        pairs = {}
        for entry in document:
            if not isinstance(entry, dict) or not {"key", "tenant"} <= entry.keys():
                raise KeyFileError("list entries need `key` and `tenant`")
            pairs[str(entry["key"])] = str(entry["tenant"])
        return pairs
    if isinstance(document, dict):
        return {str(k): str(v) for k, v in document.items()}
    raise KeyFileError("expected a mapping key -> tenant")


def parse_keys_env(value: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for position, item in enumerate(value.split(","), start=1):
        if not item.strip():
            continue
        key, sep, tenant = item.strip().partition("=")
        if not sep or not key or not tenant:
            # Which entry, never any of its characters: they may be a key.
            raise KeyFileError(f"{KEYS_ENV}: entry {position} is not key=tenant")
        pairs[key] = tenant
    return pairs


def load_keys(path: str | None, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    keys: dict[str, str] = {}
    if path:
        keys.update(parse_keys(Path(path).read_text()))
    if environ.get(KEYS_ENV):
        keys.update(parse_keys_env(environ[KEYS_ENV]))
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeyRing:
    """Keys held only as SHA-256 digests; lookup compares digests in constant time."""

    digests: tuple[tuple[bytes, str], ...]

    @classmethod
    def of(cls, keys: Mapping[str, str], tenants: set[str]) -> KeyRing:
        unknown = sorted({t for t in keys.values() if t not in tenants})
        if unknown:
            raise KeyFileError(f"API keys refer to unknown tenants: {', '.join(unknown)}")
        return cls(tuple((_digest(k), t) for k, t in keys.items()))

    def tenant_of(self, key: str) -> str | None:
        digest = _digest(key)
        found = None
        for candidate, tenant in self.digests:  # no early exit: timing does not reveal position
            if hmac.compare_digest(candidate, digest):
                found = tenant
        return found


def bearer_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return x_api_key or None


def resolve_class(
    scheduler: SchedulerSpec,
    tenant: Tenant,
    *,
    requested_name: str | None,
    requested_priority: int | None,
) -> SLOClass:
    """The class a client's request runs in (`sla_contract.decide_class`, strict: an unknown
    class name or priority is the client's error): what it asked for (header name or body
    priority), else the tenant's default, else the service default; capped at the tenant's
    maxClass."""
    return decide_class(
        scheduler.classes,
        scheduler.default_class,
        name=requested_name,
        priority=requested_priority,
        tenant_default=tenant.default_class,
        tenant_max=tenant.max_class,
        strict=True,
    )


def with_fields(
    raw: bytes, document: Mapping[str, Any], fields: Mapping[str, object], encoded: bytes | None = None
) -> bytes:
    """The body to forward: the client's JSON object `raw` (parsed: `document`) with `fields` set.

    When the client sent none of `fields` (the usual case) they are appended to its bytes as
    they are, which is cheaper than re-serialising the whole request; otherwise (a client-sent
    value to replace, or a body that is not plain UTF-8 text starting with `{`) the document is
    serialised again with the fields replaced. `encoded` is `fields` as compact JSON, when the
    caller has it already.
    """
    body = raw.strip()
    extra = encoded if encoded is not None else json.dumps(fields, separators=(",", ":")).encode()
    if body[:1] == b"{" and body[-1:] == b"}" and not any(key in document for key in fields):
        if not document:
            return extra
        return body[:-1] + b"," + extra[1:]
    return json.dumps({**document, **fields}, separators=(",", ":")).encode()


def engine_fields(slo_class: SLOClass, tenant: str, policy: str) -> dict[str, object]:
    """Body fields the engine's scheduler reads. Client-sent values are replaced, not merged:
    a client must not name its own tenant or class to the engine."""
    fields: dict[str, object] = {"vllm_xargs": {"slo_class": slo_class.name, "tenant": tenant}}
    # Under fcfs vLLM ignores priority; sending 0 keeps a client-sent value from leaking through.
    fields["priority"] = slo_class.priority if policy != "fcfs" else 0
    return fields
