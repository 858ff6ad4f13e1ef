"""The one class decision (`sla_contract.decide_class`) and the names the gateway, the launcher
and the SLA scheduler share."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenfleet.engine.sla_contract import REJECT_PREFIX, SPEC_ENV, ClassError, decide_class
from tokenfleet.engine.sla_policy import PolicyConfig
from tokenfleet.spec import SchedulerSpec

SPEC = SchedulerSpec()  # interactive 0, standard 1, batch 2; default standard
NAMES = [c.name for c in SPEC.classes]


def decide(**kwargs: object) -> str:
    return decide_class(SPEC.classes, SPEC.default_class, **kwargs).name  # type: ignore[arg-type]


def test_precedence_name_then_priority_then_tenant_default_then_service_default() -> None:
    assert decide(name="batch", priority=0, tenant_default="interactive") == "batch"
    assert decide(priority=2, tenant_default="interactive") == "batch"
    assert decide(tenant_default="interactive") == "interactive"
    assert decide() == "standard"


def test_the_tenant_ceiling_caps_and_never_raises() -> None:
    assert decide(name="interactive", tenant_max="standard") == "standard"
    assert decide(priority=0, tenant_max="batch") == "batch"
    assert decide(tenant_default="interactive", tenant_max="standard") == "standard"
    assert decide(name="batch", tenant_max="standard") == "batch"  # below the cap: kept


def test_strict_refuses_what_lenient_ignores() -> None:
    with pytest.raises(ClassError, match="unknown class 'vip'"):
        decide(name="vip", strict=True)
    with pytest.raises(ClassError, match="not a class priority"):
        decide(priority=7, strict=True)
    # Lenient (the scheduler): an unknown name falls through to the priority, then the defaults.
    assert decide(name="vip", priority=2) == "batch"
    assert decide(name="vip", priority=7, tenant_default="batch") == "batch"


@given(
    st.sampled_from([None, "vip", *NAMES]),
    st.sampled_from([None, 0, 1, 2, 7]),
    st.sampled_from([None, *NAMES]),
    st.sampled_from([None, *NAMES]),
)
def test_gateway_and_scheduler_types_decide_alike(
    name: str | None, priority: int | None, default: str | None, ceiling: str | None
) -> None:
    """The gateway holds `spec.SLOClass`, the scheduler `ClassPolicy`: same inputs, same class."""
    policy = PolicyConfig.from_spec(SPEC)
    kwargs = {"name": name, "priority": priority, "tenant_default": default, "tenant_max": ceiling}
    from_spec = decide_class(SPEC.classes, SPEC.default_class, **kwargs)  # type: ignore[arg-type]
    from_policy = decide_class(policy.classes, policy.default_class, **kwargs)  # type: ignore[arg-type]
    assert from_spec.name == from_policy.name
    if ceiling is not None:
        assert from_spec.priority >= SPEC.class_named(ceiling).priority


def test_the_shared_names_and_a_light_import() -> None:
    assert SPEC_ENV == "TOKENFLEET_SCHEDULER_SPEC"
    assert REJECT_PREFIX == "tokenfleet:rejected"
    # The launcher and the gateway import it: it must not pull in vLLM or FastAPI.
    code = (
        "import sys, tokenfleet.engine.sla_contract; "
        "print(any(m.split('.')[0] in ('vllm', 'fastapi', 'torch') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
