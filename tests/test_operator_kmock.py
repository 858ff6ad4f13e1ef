"""The kopf operator running for real against kmock (an in-memory Kubernetes API).

kmock stores objects and merges patches; it has no controllers. Two gaps are filled here, in
an emulator subclass, the way a real API server behaves: server-side apply creates a missing
object. kmock has no `scale` subresource, so the scale test writes what the API server would:
the count at the CRD's specReplicasPath.
Deployments never get a status by themselves: tests patch it to play the Deployment controller.
Time is looptime's fake loop clock, which the operator's timer and the control core's clock use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
import pytest_asyncio
import yaml
from kmock._internal import enums, rendering
from prometheus_client import generate_latest

from tokenfleet.engine.fleet import free_port
from tokenfleet.engine.gateway.metrics import GatewayMetrics
from tokenfleet.operator.control import Signals, WindowStats
from tokenfleet.operator.crd import SPEC_REPLICAS_PATH
from tokenfleet.operator.handlers import FINALIZER, OperatorConfig, build_registry
from tokenfleet.operator.loop import Metrics, MetricsSource
from tokenfleet.operator.metrics import GatewayScraper
from tokenfleet.operator.model import Conventions
from tokenfleet.operator.rbac import granted, rbac_manifests
from tokenfleet.spec import LLMService

NS = "llm"
RES = "tokenfleet.dev/v1alpha1/llmservices"
BASE = f"/apis/tokenfleet.dev/v1alpha1/namespaces/{NS}/llmservices"


class ApiServer(kmock.KubernetesEmulator):
    """kmock plus server-side apply's create-if-missing (see module doc)."""

    async def _handle(self, request: rendering.Request) -> Any:
        if request.resource is not None and request.method == "PATCH" and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            content_type = request.headers.get("Content-Type", "")
            if content_type.startswith("application/apply-patch") and (
                key not in self._objects or self._objects[key].deleted
            ):
                async with self._lock:
                    if key in self._objects:
                        self._objects[key].create(request.data)
                    else:
                        self._objects[key] = request.data
        return await super()._handle(request)


def scale_write(replicas: int) -> dict[str, Any]:
    """What the API server writes for a `scale` subresource update: n at specReplicasPath."""
    data: dict[str, Any] = {}
    node = data
    *parents, leaf = SPEC_REPLICAS_PATH.strip(".").split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = replicas
    return data


def service_doc(name: str = "chat", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"name": "tiny-code", "source": "builtin://tiny-code"},
        "replicas": {"min": 2, "max": 4},
        "rollout": {"strategy": "canary", "canarySteps": [50, 100], "stepDurationS": 60, "minRequests": 20},
    }
    base.update(spec)
    return {
        "apiVersion": "tokenfleet.dev/v1alpha1",
        "kind": "LLMService",
        # kopf guards finalizer patches with a JSON-patch test of resourceVersion; kmock keeps none.
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": base,
    }


async def wait_for(cond: Callable[[], bool], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.05)


def obj(k: Any, resource: str, name: str) -> dict[str, Any] | None:
    try:
        found = k.objects[resource, NS, name]
    except KeyError:
        return None
    return None if found.deleted else dict(found)


def status_of(k: Any, name: str = "chat") -> dict[str, Any]:
    found = obj(k, RES, name)
    return (found or {}).get("status") or {}


class Harness:
    def __init__(
        self,
        k: Any,
        metrics: Metrics | None = None,
        liveness: str | None = None,
        clock: Callable[[], float] | None = None,
        source: MetricsSource | None = None,
    ) -> None:
        self.k = k
        self.clock = clock
        self.source = source
        self.metrics = metrics
        self.liveness = liveness
        self.task: asyncio.Task[None] | None = None
        self.config: OperatorConfig | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        async def source(service: LLMService, window_start: float | None) -> Metrics | None:
            return self.metrics

        config = OperatorConfig(
            server=str(self.k.url),
            metrics_source=self.source or source,
            control_interval_s=10,
            clock=self.clock or loop.time,
        )
        self.config = config
        registry, _ = build_registry(config)
        watch = self.k[f"watch {RES}"]  # one view: every kmock[...] adds a filter to scan
        watches = len(watch)
        self.stop_flag = asyncio.Event()
        self.task = asyncio.create_task(
            kopf_operator(
                registry=registry,
                clusterwide=True,
                standalone=True,
                stop_flag=self.stop_flag,
                liveness_endpoint=self.liveness,
            )
        )
        await wait_for(lambda: len(watch) > watches)

    async def stop(self) -> None:
        # A graceful stop: kopf runs the cleanup handlers (our HTTP session closes) and waits up
        # to 5 s of loop time for stragglers — fake time under looptime.
        if self.task is None:
            return
        task, self.task = self.task, None
        self.stop_flag.set()
        await asyncio.wait_for(task, 30)


def kopf_operator(**kwargs: Any) -> Coroutine[Any, Any, None]:
    import kopf

    return kopf.operator(**kwargs)


@pytest_asyncio.fixture
async def api(kmock: Any) -> AsyncIterator[Any]:
    kmock.resources.load_bundled()
    kmock.resources[RES] = kmock.ResourceInfo(
        kind="LLMService",
        singular="llmservice",
        namespaced=True,
        verbs={"list", "watch", "get", "patch", "create", "delete"},
        subresources={"status", "scale"},
    )
    kmock.resources["monitoring.coreos.com/v1/servicemonitors"] = kmock.ResourceInfo(
        kind="ServiceMonitor",
        singular="servicemonitor",
        namespaced=True,
        verbs={"get", "patch", "create", "delete"},
    )
    yield kmock


@pytest_asyncio.fixture
async def run_operator(api: Any) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """Start an operator (a fresh registry each time); every one is stopped at teardown."""
    started: list[Harness] = []

    async def start(
        metrics: Metrics | None = None,
        liveness: str | None = None,
        clock: Callable[[], float] | None = None,
        source: MetricsSource | None = None,
    ) -> Harness:
        harness = Harness(api, metrics, liveness, clock, source)
        started.append(harness)
        await harness.start()
        return harness

    yield start
    # Tests stop their operators themselves (in fake time); this only cleans up after a failure.
    for harness in started:
        with contextlib.suppress(BaseException):
            await harness.stop()


async def mark_ready(k: Any, name: str, ready: int, generation: int = 1) -> None:
    """Play the Deployment controller: `ready` replicas up to date and ready."""
    resp = await k.patch(
        f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status",
        json={
            "metadata": {"generation": generation},
            "status": {
                "replicas": ready,
                "readyReplicas": ready,
                "updatedReplicas": ready,
                "observedGeneration": generation,
            },
        },
    )
    assert resp.status == 200


async def patch_spec(k: Any, name: str, spec: dict[str, Any], generation: int) -> None:
    resp = await k.patch(f"{BASE}/{name}", json={"metadata": {"generation": generation}, "spec": spec})
    assert resp.status == 200


def events(k: Any) -> list[dict[str, Any]]:
    return [r.data for r in k if r.method == "POST" and r.url.path.endswith("/events")]


pytestmark = [
    pytest.mark.kmock(cls=ApiServer),
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_create_scale_canary_promote_delete(api: Any, run_operator: Any) -> None:
    k = api
    harness = await run_operator(Metrics(Signals(), {}))
    resp = await k.post(BASE, json=service_doc())
    assert resp.status == 200

    # create: every child object, owned by the service, and a status with conditions
    await wait_for(lambda: status_of(k).get("observedGeneration") == 1)
    expected = {
        "apps/v1/deployments": ["chat-engine", "chat-gateway"],
        "v1/services": ["chat", "chat-engine", "chat-engine-stable", "chat-engine-canary"],
        "v1/serviceaccounts": ["chat-gateway"],
        "rbac.authorization.k8s.io/v1/roles": ["chat-gateway"],
        "rbac.authorization.k8s.io/v1/rolebindings": ["chat-gateway"],
        "v1/configmaps": ["chat-gateway"],
        "policy/v1/poddisruptionbudgets": ["chat-engine", "chat-gateway"],
        "networking.k8s.io/v1/networkpolicies": ["chat-default-deny", "chat-engine", "chat-gateway"],
        "monitoring.coreos.com/v1/servicemonitors": ["chat"],
    }
    for resource, names in expected.items():
        for name in names:
            child = obj(k, resource, name)
            assert child is not None, (resource, name)
            assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
    assert obj(k, "apps/v1/deployments", "chat-engine-canary") is None
    stable = obj(k, "apps/v1/deployments", "chat-engine")
    assert stable is not None
    assert stable["spec"]["replicas"] == 2
    status = status_of(k)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["reason"] == "ReplicasNotReady"
    assert status["selector"] == "tokenfleet.dev/component=engine,tokenfleet.dev/service=chat"
    assert FINALIZER in obj(k, RES, "chat")["metadata"]["finalizers"]  # type: ignore[index]
    # server-side apply, with our field manager
    applies = [r for r in k if r.method == "PATCH" and "apply-patch" in r.headers.get("Content-Type", "")]
    assert applies
    assert all(r.params.get("fieldManager") == "tokenfleet-operator" for r in applies)
    await wait_for(lambda: any("applied 16 objects for generation 1" in e["message"] for e in events(k)))

    # status patches: the Deployment controller reports ready → the timer turns Ready True
    await mark_ready(k, "chat-engine", 2)
    await mark_ready(k, "chat-gateway", 1)
    await asyncio.sleep(11)
    conditions = {c["type"]: c for c in status_of(k)["conditions"]}
    assert conditions["Ready"]["status"] == "True", conditions
    assert conditions["Progressing"]["reason"] == "RolloutComplete"
    assert status_of(k)["replicas"] == 2

    # scale subresource: kubectl scale --replicas=3 → spec.replicas.min = 3 → 3 engines
    resp = await k.patch(f"{BASE}/chat", json=scale_write(3))
    assert resp.status == 200
    assert obj(k, RES, "chat")["spec"]["replicas"] == {"min": 3, "max": 4}  # type: ignore[index]
    await wait_for(lambda: obj(k, "apps/v1/deployments", "chat-engine")["spec"]["replicas"] == 3)  # type: ignore[index]
    await wait_for(lambda: status_of(k).get("desiredReplicas") == 3)
    await mark_ready(k, "chat-engine", 3)

    # a new engine revision under the canary strategy: a canary Deployment at 50%
    old_revision = status_of(k)["rollout"]["revision"]
    await patch_spec(k, "chat", {"engine": {"maxNumSeqs": 16}}, generation=2)
    await wait_for(lambda: obj(k, "apps/v1/deployments", "chat-engine-canary") is not None)
    canary = obj(k, "apps/v1/deployments", "chat-engine-canary")
    assert canary is not None
    assert canary["spec"]["replicas"] == 2
    assert "16" in canary["spec"]["template"]["spec"]["containers"][0]["command"]
    stable = obj(k, "apps/v1/deployments", "chat-engine")
    assert stable is not None
    assert "8" in stable["spec"]["template"]["spec"]["containers"][0]["command"]
    assert status_of(k)["rollout"]["stableRevision"] == old_revision
    new_revision = status_of(k)["rollout"]["revision"]
    assert new_revision != old_revision

    # a rollout step: canary ready, healthy analysis window, stepDurationS passes → 100%
    await mark_ready(k, "chat-engine-canary", 2)
    harness.metrics = Metrics(
        Signals(recent_requests=100),
        {
            old_revision: WindowStats(requests=80, errors=0, ttft_floors=((0.0, 80),)),
            new_revision: WindowStats(requests=40, errors=0, ttft_floors=((0.0, 40),)),
        },
    )
    await wait_for(lambda: status_of(k)["rollout"]["canaryWeightPercent"] == 50, timeout=30)
    assert status_of(k)["phase"] == "Progressing"
    await wait_for(lambda: obj(k, "apps/v1/deployments", "chat-engine-canary")["spec"]["replicas"] == 3, 120)  # type: ignore[index]
    await mark_ready(k, "chat-engine-canary", 3)
    # promoted: the stable track runs the new revision, the canary is deleted
    await wait_for(lambda: obj(k, "apps/v1/deployments", "chat-engine-canary") is None, timeout=60)
    stable = obj(k, "apps/v1/deployments", "chat-engine")
    assert stable is not None
    assert "16" in stable["spec"]["template"]["spec"]["containers"][0]["command"]
    assert status_of(k)["rollout"]["stableRevision"] == new_revision
    messages = [e.get("message", "") for e in events(k)]
    assert any("step 1 (50%) passed" in m for m in messages), messages
    assert any("canary promoted" in m for m in messages), messages

    # delete: the finalizer removes every child, then the object goes
    resp = await k.delete(f"{BASE}/chat")
    assert resp.status == 200
    await wait_for(lambda: obj(k, RES, "chat") is None)
    for resource, names in expected.items():
        for name in names:
            assert obj(k, resource, name) is None, (resource, name)
    await harness.stop()

    assert_rbac_covers(k)


def assert_rbac_covers(k: Any) -> None:
    """Every request the operator made is granted by its RBAC (verbs from method + URL)."""
    rules = granted(rbac_manifests("tokenfleet-system"))
    used = set()
    for request in k:
        if request.resource is None or request.resource.plural is None:
            continue  # discovery (/apis/<group>/<version>): open to every authenticated user
        if "kmock" in request.headers.get("User-Agent", "").lower():
            continue  # the test's own client
        used.add(_verb_of(request))
    test_only = {("", "deployments/status"), ("tokenfleet.dev", "llmservices/scale")}
    missing = {u for u in used if (u[0], u[1]) not in test_only and (u[0], u[1], u[2], None) not in rules}
    assert not missing, missing


def _verb_of(request: Any) -> tuple[str, str, str]:
    resource = request.resource
    plural = resource.plural + (f"/{request.subresource}" if request.subresource else "")
    action = request.action
    verb = {
        enums.action.LIST: "list",
        enums.action.WATCH: "watch",
        enums.action.FETCH: "get",
        enums.action.CREATE: "create",
        enums.action.UPDATE: "patch",
        enums.action.DELETE: "delete",
    }[action]
    return (resource.group, plural, verb)


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_restart_mid_rollout_resumes_without_duplicates(api: Any, run_operator: Any) -> None:
    k = api
    first = await run_operator()
    assert (await k.post(BASE, json=service_doc())).status == 200
    await wait_for(lambda: status_of(k).get("observedGeneration") == 1)
    await mark_ready(k, "chat-engine", 2)
    await mark_ready(k, "chat-gateway", 1)
    await patch_spec(k, "chat", {"engine": {"maxNumSeqs": 32}}, generation=2)
    await wait_for(lambda: obj(k, "apps/v1/deployments", "chat-engine-canary") is not None)
    await wait_for(lambda: status_of(k).get("observedGeneration") == 2)
    before = copy.deepcopy(status_of(k)["control"]["rollout"])
    assert before["phase"] == "progressing"
    await first.stop()

    # a new operator process: kopf's resume handler and the timer reconcile the same object
    second = await run_operator()
    await asyncio.sleep(25)  # two timer ticks
    after = status_of(k)["control"]["rollout"]
    assert after["target"] == before["target"]
    assert after["stable"] == before["stable"]
    canary = obj(k, "apps/v1/deployments", "chat-engine-canary")
    assert canary is not None
    assert canary["spec"]["replicas"] == 1  # ceil(2 * 50%), not restarted from scratch
    deployments = sorted(name for (res, ns, name) in k.objects if res == "apps/v1/deployments")
    assert deployments == ["chat-engine", "chat-engine-canary", "chat-gateway"]
    assert not [r for r in k if r.method == "DELETE"], "nothing deleted on restart"
    started = [e for e in events(k) if "canary rollout of" in e["message"]]
    assert len(started) == 1, started
    await second.stop()


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_invalid_spec_reported_in_status_then_fixed(api: Any, run_operator: Any) -> None:
    k = api
    port = free_port()
    harness = await run_operator(liveness=f"http://127.0.0.1:{port}/healthz")
    bad = service_doc(replicas={"min": 5, "max": 2})
    assert (await k.post(BASE, json=bad)).status == 200
    await wait_for(lambda: status_of(k).get("phase") == "Invalid")
    status = status_of(k)
    assert status["errors"] == [{"field": "spec.replicas", "reason": "min (5) must not exceed max (2)"}]
    degraded = {c["type"]: c for c in status["conditions"]}["Degraded"]
    assert degraded["status"] == "True"
    assert degraded["reason"] == "InvalidSpec"
    assert obj(k, "apps/v1/deployments", "chat-engine") is None, "nothing applied for an invalid spec"
    await wait_for(lambda: any(e["reason"] == "InvalidSpec" for e in events(k)))

    await patch_spec(k, "chat", {"replicas": {"min": 1, "max": 2}}, generation=2)
    await wait_for(lambda: status_of(k).get("phase") not in (None, "Invalid"))
    assert status_of(k).get("errors") is None
    assert obj(k, "apps/v1/deployments", "chat-engine") is not None

    # the operator's own health (kopf's liveness endpoint) and metrics
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as resp:
        assert resp.status == 200
    assert harness.config is not None
    registry = harness.config.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    triggers = ("create", "update", "resume", "timer")
    invalid = sum(
        sample("tokenfleet_operator_reconciles_total", trigger=t, outcome="invalid") for t in triggers
    )
    assert invalid >= 1
    assert sample("tokenfleet_operator_reconciles_total", trigger="update", outcome="ok") >= 1
    assert sample("tokenfleet_operator_decisions_total", reason="InvalidSpec") == 1
    assert sample("tokenfleet_operator_applied_objects_total", kind="Deployment") >= 2
    await harness.stop()


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_api_keys_secret_read_and_rolls_gateway(api: Any, run_operator: Any) -> None:
    k = api
    harness = await run_operator()
    doc = service_doc(gateway={"auth": True, "apiKeysSecret": "chat-keys"})
    assert (await k.post(BASE, json=doc)).status == 200
    await wait_for(lambda: status_of(k).get("phase") == "Degraded")
    degraded = {c["type"]: c for c in status_of(k)["conditions"]}["Degraded"]
    assert degraded["reason"] == "ApiKeysUnavailable"
    assert "'chat-keys' (gateway.apiKeysSecret) not found" in degraded["message"]

    keys = base64.b64encode(b"sk-123: default\n").decode()
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chat-keys", "namespace": NS}}
    assert (
        await k.post(f"/api/v1/namespaces/{NS}/secrets", json={**secret, "data": {"keys.yaml": keys}})
    ).status == 200
    await wait_for(lambda: status_of(k).get("phase") != "Degraded", timeout=30)
    gateway = obj(k, "apps/v1/deployments", "chat-gateway")
    assert gateway is not None
    template = gateway["spec"]["template"]
    first_hash = template["metadata"]["annotations"]["tokenfleet.dev/api-keys-hash"]
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "chat-keys"
    config = obj(k, "v1/configmaps", "chat-gateway")
    assert config is not None
    assert "apiKeysFile: /etc/tokenfleet/keys/keys.yaml" in config["data"]["service.yaml"]

    # rotated keys → a new hash on the pod template → the gateway rolls
    rotated = base64.b64encode(b"sk-456: default\n").decode()
    resp = await k.patch(f"/api/v1/namespaces/{NS}/secrets/chat-keys", json={"data": {"keys.yaml": rotated}})
    assert resp.status == 200
    await wait_for(
        lambda: (
            obj(k, "apps/v1/deployments", "chat-gateway")["spec"]["template"]["metadata"]["annotations"][  # type: ignore[index]
                "tokenfleet.dev/api-keys-hash"
            ]
            != first_hash
        ),
        timeout=30,
    )

    # keys for a tenant the spec does not have: Degraded with the reason
    unknown = base64.b64encode(b"sk-789: mallory\n").decode()
    await k.patch(f"/api/v1/namespaces/{NS}/secrets/chat-keys", json={"data": {"keys.yaml": unknown}})
    await wait_for(lambda: status_of(k).get("phase") == "Degraded", timeout=30)
    degraded = {c["type"]: c for c in status_of(k)["conditions"]}["Degraded"]
    assert "unknown tenants ['mallory']" in degraded["message"]
    await harness.stop()


@pytest.mark.asyncio
async def test_cli_operator_run_logs_in_with_the_kubeconfig(api: Any, tmp_path: Path) -> None:
    """`tokenfleet operator run` as a process: kopf's kubeconfig login, then a real reconcile."""
    k = api
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": str(k.url).rstrip("/")}}],
                "users": [{"name": "dev", "user": {"token": "t"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "dev"}}],
                "current-context": "kmock",
            }
        )
    )
    health = free_port()
    collector = "http://otel-collector-opentelemetry-collector.monitoring.svc:4318"
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        # The installation settings infra/ passes to the operator's container.
        "TOKENFLEET_GATEWAY_IMAGE": "example.org/gw:1.2.3",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
    }
    for name in ("KUBERNETES_SERVICE_HOST", "TOKENFLEET_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        env.pop(name, None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenfleet.cli",
        "operator",
        "run",
        "--metrics-port=0",
        f"--liveness=http://127.0.0.1:{health}/healthz",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        watch = k[f"watch {RES}"]
        await wait_for(lambda: len(watch) > 0, timeout=60)
        assert (await k.post(BASE, json=service_doc())).status == 200
        await wait_for(lambda: status_of(k).get("observedGeneration") == 1, timeout=60)
        gateway = obj(k, "apps/v1/deployments", "chat-gateway")
        assert gateway is not None
        (container,) = gateway["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "example.org/gw:1.2.3"
        # Traces: the gateway exports to the collector, and so does vLLM in the engine pods.
        assert {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": collector} in container["env"]
        engine = obj(k, "apps/v1/deployments", "chat-engine")
        assert engine is not None
        argv = engine["spec"]["template"]["spec"]["containers"][0]["command"]
        assert argv[argv.index("--otlp-traces-endpoint") + 1] == f"{collector}/v1/traces"
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{health}/healthz") as resp,
        ):
            assert resp.status == 200
        assert any(r.headers.get("Authorization") == "Bearer t" for r in k)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_unschedulable_engines_fall_back_to_the_next_gpu_pool(api: Any, run_operator: Any) -> None:
    k = api
    harness = await run_operator(clock=time.time)  # pod creation times are wall-clock
    pools = [
        {"name": "h100", "nodeSelector": {"pool": "h100"}},
        {"name": "l40s", "nodeSelector": {"pool": "l40s"}},
    ]
    engine = {"device": "gpu", "gpusPerReplica": 1, "gpuPools": pools}
    doc = service_doc(engine=engine, failover={"pendingTimeoutS": 60})
    assert (await k.post(BASE, json=doc)).status == 200
    await wait_for(lambda: status_of(k).get("observedGeneration") == 1)
    stable = obj(k, "apps/v1/deployments", "chat-engine")
    assert stable is not None
    assert stable["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "h100"}

    # an engine pod the scheduler has not placed for ten minutes (no H100 capacity)
    created = datetime.datetime.now(tz=datetime.UTC) - datetime.timedelta(minutes=10)
    labels = dict(stable["spec"]["template"]["metadata"]["labels"])
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "chat-engine-abc",
            "namespace": NS,
            "labels": labels,
            "creationTimestamp": created.isoformat().replace("+00:00", "Z"),
        },
        "status": {"phase": "Pending"},
    }
    assert (await k.post(f"/api/v1/namespaces/{NS}/pods", json=pod)).status == 200
    await wait_for(
        lambda: (
            obj(k, "apps/v1/deployments", "chat-engine")["spec"]["template"]["spec"]["nodeSelector"]  # type: ignore[index]
            == {"pool": "l40s"}
        ),
        timeout=30,
    )
    assert status_of(k)["control"]["gpuPool"] == 1
    assert any("falling back to pool 1" in e["message"] for e in events(k))
    await harness.stop()
    assert_rbac_covers(k)


class FakeGatewayMetrics:
    """A gateway's `/metrics`: its real per-revision counters (GatewayMetrics.count_outcome), fed
    by the test as traffic would, and read by the operator's real scraper and parser."""

    def __init__(self) -> None:
        self.metrics = GatewayMetrics()
        self.urls: list[str] = []

    async def fetch(self, url: str) -> str | None:
        self.urls.append(url)
        return generate_latest(self.metrics.registry).decode()

    def serve(self, revision: str, ok: int, errors: int = 0, ttft_s: float = 0.05) -> None:
        for _ in range(ok):
            self.metrics.count_outcome(revision, "ok", ttft_s)
        for _ in range(errors):
            self.metrics.count_outcome(revision, "error", None)


def weights_of(k: Any) -> dict[str, int]:
    config = obj(k, "v1/configmaps", "chat-gateway")
    assert config is not None
    weights: dict[str, int] = json.loads(config["data"]["weights.json"])
    return weights


async def canary_at_first_step(k: Any, run_operator: Any) -> tuple[Harness, FakeGatewayMetrics, str, str]:
    """A service with traffic on its stable revision, then a new revision whose canary is ready
    and whose first step (50%) has started: the weights are in the gateway's ConfigMap."""
    gateway = FakeGatewayMetrics()
    loop = asyncio.get_running_loop()
    scraper = GatewayScraper(Conventions(), clock=loop.time, fetch=gateway.fetch)
    harness = await run_operator(source=scraper)
    assert (await k.post(BASE, json=service_doc())).status == 200
    await wait_for(lambda: status_of(k).get("observedGeneration") == 1)
    assert weights_of(k) == {}, "no canary: the gateway treats every replica alike"
    await mark_ready(k, "chat-engine", 2)
    await mark_ready(k, "chat-gateway", 1)
    old = status_of(k)["rollout"]["revision"]
    gateway.serve(old, 500)  # before the canary: outside any analysis window

    await patch_spec(k, "chat", {"engine": {"maxNumSeqs": 16}}, generation=2)
    await wait_for(lambda: obj(k, "apps/v1/deployments", "chat-engine-canary") is not None)
    new = status_of(k)["rollout"]["revision"]
    await wait_for(lambda: weights_of(k) == {old: 100, new: 0})  # canary pods get nothing yet
    await mark_ready(k, "chat-engine-canary", 1)
    await wait_for(lambda: status_of(k)["control"]["rollout"].get("stepStartedAt") is not None, timeout=30)
    assert weights_of(k) == {old: 50, new: 50}
    assert gateway.urls[0] == "http://chat.llm.svc.cluster.local:8000/metrics"
    return harness, gateway, old, new


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_canary_promoted_on_good_per_revision_stats_from_the_gateway(
    api: Any, run_operator: Any
) -> None:
    k = api
    harness, gateway, old, new = await canary_at_first_step(k, run_operator)
    # In the warm-up (warmupS 20) the fresh canary answers slowly: not compared, still counted.
    gateway.serve(old, 10, ttft_s=0.05)
    gateway.serve(new, 10, ttft_s=3.0)
    await asyncio.sleep(25)
    gateway.serve(old, 30, ttft_s=0.05)
    gateway.serve(new, 30, ttft_s=0.05)
    # minRequests reached and stepDurationS (60 s) passed → step 2 (100%): the canary takes every replica
    await wait_for(lambda: obj(k, "apps/v1/deployments", "chat-engine-canary")["spec"]["replicas"] == 2, 120)  # type: ignore[index]
    messages = [e.get("message", "") for e in events(k)]
    passed = [m for m in messages if "step 1 (50%) passed" in m]
    assert passed, messages
    assert "over 40 canary requests" in passed[0], "only the window's requests count"
    assert "TTFT p99 50 ms vs 50 ms" in passed[0], "the warm-up's slow answers are not in the P99"
    await mark_ready(k, "chat-engine-canary", 2)
    await wait_for(lambda: obj(k, "apps/v1/deployments", "chat-engine-canary") is None, timeout=60)
    assert status_of(k)["rollout"]["stableRevision"] == new
    await wait_for(lambda: weights_of(k) == {}, timeout=120)  # once the canary Deployment is gone
    assert any("canary promoted" in e.get("message", "") for e in events(k))

    assert (await k.delete(f"{BASE}/chat")).status == 200
    await wait_for(lambda: obj(k, RES, "chat") is None)
    assert obj(k, "v1/configmaps", "chat-gateway") is None
    assert obj(k, "rbac.authorization.k8s.io/v1/roles", "chat-gateway") is None
    await harness.stop()
    assert_rbac_covers(k)


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_canary_rolled_back_on_bad_per_revision_stats_from_the_gateway(
    api: Any, run_operator: Any
) -> None:
    k = api
    harness, gateway, old, new = await canary_at_first_step(k, run_operator)
    gateway.serve(old, 30)
    gateway.serve(new, 15, errors=10)  # a third of the canary's attempts fail
    await wait_for(lambda: obj(k, "apps/v1/deployments", "chat-engine-canary") is None, timeout=30)
    status = status_of(k)
    degraded = {c["type"]: c for c in status["conditions"]}["Degraded"]
    assert degraded["reason"] == "CanaryRolledBack", degraded
    assert "error rate 40.0%" in degraded["message"], degraded["message"]
    assert status["rollout"]["stableRevision"] == old
    written = [
        json.loads(r.data["data"]["weights.json"])
        for r in k
        if r.method == "PATCH" and r.url.path.endswith("/configmaps/chat-gateway")
    ]
    assert {old: 100} in written, "the rejected canary's pods got no traffic while being deleted"
    await wait_for(lambda: weights_of(k) == {}, timeout=120)  # once the canary Deployment is gone
    stable = obj(k, "apps/v1/deployments", "chat-engine")
    assert stable is not None
    assert "8" in stable["spec"]["template"]["spec"]["containers"][0]["command"]
    await harness.stop()
    assert_rbac_covers(k)
