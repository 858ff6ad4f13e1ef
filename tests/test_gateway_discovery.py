"""Gateway endpoint discovery: the pure decisions, and a gateway following a fake API (kmock).

The pure part turns EndpointSlices and the ConfigMap's weights into replica-set changes. The
integration test runs the real gateway app (uvicorn in a thread) with discovery pointed at kmock,
in front of two fake engines, and checks that added, unready and deleted endpoints and weight
changes reach routing — by polling what the gateway reports, never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import kmock
import pytest

from tokenfleet.engine.fleet import free_port
from tokenfleet.engine.gateway.app import Gateway, create_app
from tokenfleet.engine.gateway.discovery import (
    ApiAccess,
    DiscoveryConfig,
    EngineEndpoint,
    endpoints_of,
    parse_weights,
    plan,
)
from tokenfleet.engine.gateway.server import ServerThread
from tokenfleet.load.fake_engine import fake_engine
from tokenfleet.spec import LLMService, parse_service

NS = "llm"
SELECTOR = "tokenfleet.dev/component=engine,tokenfleet.dev/service=chat,tokenfleet.dev/track"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
CONFIGMAPS = f"/api/v1/namespaces/{NS}/configmaps"


def slice_doc(
    name: str,
    track: str,
    revision: str,
    endpoints: list[tuple[str, str, bool | None]],
    port: int = 8000,
    service: str = "chat",
    address_type: str = "IPv4",
) -> dict[str, Any]:
    """An EndpointSlice as the controller writes it: the Service's labels, one port, endpoints."""
    items = []
    for pod, address, ready in endpoints:
        conditions = {} if ready is None else {"ready": ready, "serving": ready, "terminating": not ready}
        items.append(
            {"addresses": [address], "conditions": conditions, "targetRef": {"kind": "Pod", "name": pod}}
        )
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {
                "kubernetes.io/service-name": f"{service}-engine-{track}",
                "tokenfleet.dev/service": service,
                "tokenfleet.dev/component": "engine",
                "tokenfleet.dev/track": track,
                "tokenfleet.dev/revision": revision,
            },
        },
        "addressType": address_type,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": items,
    }


# -- the pure part -------------------------------------------------------------------------------


def test_ready_endpoints_of_matching_slices_only() -> None:
    slices = [
        slice_doc("s1", "stable", "r1", [("p1", "10.0.0.1", True), ("p2", "10.0.0.2", False)]),
        slice_doc("s2", "canary", "r2", [("p3", "10.0.0.3", None)]),  # unset ready means ready
        slice_doc("s3", "stable", "r9", [("p9", "10.0.0.9", True)], service="other"),  # another service
        slice_doc("s4", "stable", "r1", [("p1", "10.0.0.1", True)]),  # the same pod in two slices
        slice_doc("s5", "canary", "r2", [("p5", "fd00::5", True)], address_type="IPv6"),
    ]
    untracked = slice_doc("s6", "stable", "r1", [("p6", "10.0.0.6", True)])
    del untracked["metadata"]["labels"]["tokenfleet.dev/track"]  # the both-tracks engine Service
    assert endpoints_of([*slices, untracked], SELECTOR) == [
        EngineEndpoint("p1", "http://10.0.0.1:8000", "r1", "stable"),
        EngineEndpoint("p3", "http://10.0.0.3:8000", "r2", "canary"),
        EngineEndpoint("p5", "http://[fd00::5]:8000", "r2", "canary"),
    ]
    no_pod = slice_doc("s7", "stable", "r1", [("", "10.0.0.7", True)])
    no_pod["endpoints"][0].pop("targetRef")
    assert [e.id for e in endpoints_of([no_pod], SELECTOR)] == ["10.0.0.7:8000"]
    assert endpoints_of([{**no_pod, "ports": []}], SELECTOR) == []


def test_weights_from_the_configmap() -> None:
    assert parse_weights({"weights.json": '{"r1": 90, "r2": 10}'}) == {"r1": 90, "r2": 10}
    assert parse_weights({"weights.json": "{}"}) is None
    assert parse_weights({"service.yaml": "x"}) is None
    assert parse_weights(None) is None
    assert parse_weights({"weights.json": "not json"}) is None
    assert parse_weights({"weights.json": '["r1"]'}) is None
    assert parse_weights({"weights.json": '{"r1": 100, "r2": "x", "r3": true, "r4": -1}'}) == {"r1": 100}


def test_plan_keeps_staying_replicas_and_names_changes() -> None:
    current = {"p1": ("http://10.0.0.1:8000", "r1"), "p2": ("http://10.0.0.2:8000", "r1")}
    endpoints = [
        EngineEndpoint("p1", "http://10.0.0.1:8000", "r1", "stable"),
        EngineEndpoint("p3", "http://10.0.0.3:8000", "r2", "canary"),
    ]
    change = plan(current, endpoints)
    assert change.members == (("p1", "http://10.0.0.1:8000"), ("p3", "http://10.0.0.3:8000"))
    assert change.revisions == {"p1": "r1", "p3": "r2"}
    assert (change.added, change.removed) == (("p3",), ("p2",))
    assert not plan({"p1": ("http://10.0.0.1:8000", "r1")}, endpoints[:1]).changed
    # a pod that moved address is replaced; one relabelled (after a promotion) keeps its state
    moved = plan({"p1": ("http://10.9.9.9:8000", "r1")}, endpoints[:1])
    assert (moved.added, moved.removed) == (("p1",), ("p1",))
    relabelled = plan({"p1": ("http://10.0.0.1:8000", "r0")}, endpoints[:1])
    assert (relabelled.added, relabelled.removed) == (("p1",), ())


def test_gateway_counts_outcomes_per_revision_in_metrics() -> None:
    from prometheus_client import generate_latest

    from tokenfleet.operator.metrics import revision_totals_from_text

    gateway = Gateway(tiny_service())
    gateway.outcomes.record("r1", "ok", 0.02)
    gateway.outcomes.record("r1", "error", None)
    gateway.outcomes.record("r2", "ok", 0.3)
    gateway.outcomes.record("r2", "refused", 0.001)
    totals = revision_totals_from_text(generate_latest(gateway.metrics.registry).decode())
    assert (totals["r1"].ok, totals["r1"].errors, totals["r2"].ok, totals["r2"].refused) == (1, 1, 1, 1)
    buckets = dict(totals["r2"].first_byte)
    assert (buckets[0.25], buckets[0.5]) == (0, 1), "a refusal's first byte is no TTFT"


def test_a_joining_replica_has_its_ejection_and_readmission_series_at_zero() -> None:
    """Initialised when the replica joins, so Prometheus sees the series before any event (a
    restarted local replica rejoins under a new id: its readmissions are never counted otherwise);
    removed with the replica's other series when it leaves."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    def counts() -> dict[tuple[str, str], float]:
        text = generate_latest(gateway.metrics.registry).decode()
        return {
            (sample.name, sample.labels["replica"]): sample.value
            for family in text_string_to_metric_families(text)
            if family.name in ("tokenfleet_gateway_ejections", "tokenfleet_gateway_readmissions")
            for sample in family.samples
            if sample.name.endswith("_total")
        }

    gateway = Gateway(tiny_service())
    assert counts() == {}
    gateway.apply_endpoints([EngineEndpoint("pod-a", "http://10.0.0.1:8000", "r1", "stable")])
    assert counts() == {
        ("tokenfleet_gateway_ejections_total", "pod-a"): 0.0,
        ("tokenfleet_gateway_readmissions_total", "pod-a"): 0.0,
    }
    gateway.metrics.readmissions.labels("pod-a").inc()
    assert counts()[("tokenfleet_gateway_readmissions_total", "pod-a")] == 1.0
    gateway.apply_endpoints([EngineEndpoint("pod-b", "http://10.0.0.2:8000", "r1", "stable")])
    assert counts() == {
        ("tokenfleet_gateway_ejections_total", "pod-b"): 0.0,
        ("tokenfleet_gateway_readmissions_total", "pod-b"): 0.0,
    }


# -- a gateway following a fake API --------------------------------------------------------------


def tiny_service() -> LLMService:
    return parse_service(
        {
            "apiVersion": "tokenfleet.dev/v1alpha1",
            "kind": "LLMService",
            "metadata": {"name": "chat", "namespace": NS},
            "spec": {
                "model": {"name": "tiny", "source": "builtin://tiny-code"},
                "routing": {"policy": "round_robin", "probeIntervalS": 0.1},
            },
        }
    )


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


pytestmark = [
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]


@pytest.mark.asyncio
@pytest.mark.kmock(cls=kmock.KubernetesEmulator)
async def test_gateway_follows_endpoints_and_weights_through_the_api(kmock: Any) -> None:
    k = kmock
    k.resources.load_bundled()
    engines = {}
    for name in ("a", "b"):
        app, _ = fake_engine(name)
        engines[name] = ServerThread(app, free_port()).start()
    stable = slice_doc(
        "chat-engine-stable-x1", "stable", "r1", [("pod-a", "127.0.0.1", True)], engines["a"].port
    )
    canary = slice_doc(
        "chat-engine-canary-x2", "canary", "r2", [("pod-b", "127.0.0.1", True)], engines["b"].port
    )
    assert (await k.post(SLICES, json=stable)).status == 200
    assert (await k.post(SLICES, json=canary)).status == 200
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "chat-gateway", "namespace": NS}}
    assert (await k.post(CONFIGMAPS, json={**config, "data": {"weights.json": "{}"}})).status == 200

    discovery = DiscoveryConfig(NS, SELECTOR, "chat-gateway")
    app = create_app(tiny_service(), discovery=discovery, api=ApiAccess(server=str(k.url)))
    gateway: Gateway = app.state.gateway
    server = ServerThread(app, free_port()).start()

    def members() -> dict[str, str]:
        return {r.id: r.revision for r in gateway.replicas.replicas.values()}

    async def served_by(n: int = 6) -> set[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            replies = [
                await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
                for _ in range(n)
            ]
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        return {r.headers["x-tokenfleet-replica"] for r in replies}

    try:
        await until(lambda: members() == {"pod-a": "r1", "pod-b": "r2"})
        await until(lambda: len(gateway.replicas.routable()) == 2)
        assert gateway.weights is None
        assert await served_by() == {"pod-a", "pod-b"}

        # the operator moves all traffic to the canary revision
        resp = await k.patch(
            f"{CONFIGMAPS}/chat-gateway", json={"data": {"weights.json": '{"r1": 0, "r2": 100}'}}
        )
        assert resp.status == 200
        await until(lambda: gateway.weights == {"r1": 0, "r2": 100})
        assert await served_by() == {"pod-b"}

        # the canary pod stops being ready (terminating): drained from the replica set
        canary["endpoints"][0]["conditions"] = {"ready": False, "serving": True, "terminating": True}
        resp = await k.patch(f"{SLICES}/chat-engine-canary-x2", json={"endpoints": canary["endpoints"]})
        assert resp.status == 200
        await until(lambda: members() == {"pod-a": "r1"})
        assert await served_by() == {"pod-a"}, "no canary replica left: its weight goes to the stable one"

        # a new stable pod appears, then the first one's slice goes away
        more = slice_doc(
            "chat-engine-stable-x3", "stable", "r1", [("pod-b2", "127.0.0.1", True)], engines["b"].port
        )
        assert (await k.post(SLICES, json=more)).status == 200
        await until(lambda: members() == {"pod-a": "r1", "pod-b2": "r1"})
        assert (await k.delete(f"{SLICES}/chat-engine-stable-x1")).status == 200
        await until(lambda: members() == {"pod-b2": "r1"})
        async with httpx.AsyncClient(base_url=server.url) as client:
            exposition = (await client.get("/metrics")).text
        assert 'replica="pod-a"' not in exposition, "a pod that left takes its series along"
        assert 'replica="pod-b2"' in exposition

        # weights cleared (no canary): every replica alike again
        resp = await k.patch(f"{CONFIGMAPS}/chat-gateway", json={"data": {"weights.json": "{}"}})
        assert resp.status == 200
        await until(lambda: gateway.weights is None)
        async with httpx.AsyncClient(base_url=server.url) as client:
            status = (await client.get("/admin/status")).json()
        assert [r["id"] for r in status["replicas"]] == ["pod-b2"]
        # the API was read with list + watch on the slices and get + watch on the ConfigMap only
        paths = {
            (r.method, r.url.path, "watch" in r.params)
            for r in k
            if "kmock" not in r.headers.get("User-Agent", "").lower()
        }
        assert ("GET", SLICES, True) in paths
        assert ("GET", f"{CONFIGMAPS}/chat-gateway", False) in paths
        assert ("GET", CONFIGMAPS, True) in paths
    finally:
        await asyncio.to_thread(server.stop)
        for engine in engines.values():
            engine.stop()


def test_cli_takes_discovery_or_fixed_replicas_not_both(capsys: pytest.CaptureFixture[str]) -> None:
    from tokenfleet.engine.gateway.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["--discover", SELECTOR, "--replica", "r0=http://127.0.0.1:1"])
    assert exited.value.code == 2
    assert "--discover and --replica exclude each other" in capsys.readouterr().err
