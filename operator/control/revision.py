"""What an engine process runs, as a short hash: the revision rollouts move between."""

from __future__ import annotations

import hashlib
import json

from tokenfleet.spec import LLMServiceSpec

# The sections an engine process is started from; the others apply without restarting engines.
ENGINE_SECTIONS = ("model", "engine", "scheduler")


def revision_of(spec: LLMServiceSpec) -> str:
    document = spec.model_dump(mode="json", by_alias=True, include=set(ENGINE_SECTIONS))
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:8]
