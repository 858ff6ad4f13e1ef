"""The pure reconcile and control tick: rendered objects, their validity, status and decisions."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tokenfleet.engine.launch import EngineCommand, engine_command
from tokenfleet.observability.otlp_endpoint import TraceExport
from tokenfleet.operator.control import Signals, WindowStats
from tokenfleet.operator.loop import ControlState, Metrics, control_tick, stable_spec_of
from tokenfleet.operator.model import (
    ApiKeysView,
    ControlDecision,
    Conventions,
    DeploymentView,
    Observed,
    revision_of,
)
from tokenfleet.operator.rbac import NAMESPACED_RULES, granted, rbac_manifests
from tokenfleet.operator.reconcile import desired_objects, desired_status
from tokenfleet.operator.workloads import cluster_model_path
from tokenfleet.spec import LLMService, load_service, parse_service

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.33"
NOW = "2026-01-01T00:00:00Z"


def gpu() -> LLMService:
    return load_service(ROOT / "examples" / "gpu.yaml")


def with_spec(service: LLMService, **spec: Any) -> LLMService:
    document = service.model_dump(mode="json", by_alias=True)
    for key, value in spec.items():
        document["spec"][key] = {**document["spec"].get(key, {}), **value}
    return parse_service(document)


def objects_of(service: LLMService, decision: ControlDecision | None = None) -> list[dict[str, Any]]:
    decision = decision or ControlDecision(stable_replicas=2, canary_replicas=1, canary_weight_percent=10)
    return desired_objects(service, Observed(uid="uid-1"), decision)


def by_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("example", ["default.yaml", "gpu.yaml"])
def test_every_rendered_manifest_is_valid_kubernetes(example: str) -> None:
    objects = objects_of(load_service(ROOT / "examples" / example))
    kinds = {o["kind"] for o in objects}
    assert kinds == {
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    }
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            continue  # a custom kind: kubernetes-validate has no schema (checked by hand below)
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "tokenfleet.dev/v1alpha1",
                "kind": "LLMService",
                "name": obj["metadata"]["ownerReferences"][0]["name"],
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def test_rbac_manifests_are_valid_and_least_privilege() -> None:
    for objects in (rbac_manifests("tokenfleet-system"), rbac_manifests("ops", ["llm", "batch"])):
        for obj in objects:
            assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION
            for rule in obj.get("rules", []):
                assert "*" not in rule["verbs"]
                assert "*" not in rule["resources"]
                assert "*" not in rule["apiGroups"]
        assert not any(
            o["kind"] == "ClusterRoleBinding" and o["roleRef"]["name"] == "cluster-admin" for o in objects
        )
    namespaced = rbac_manifests("ops", ["llm", "batch"])
    roles = [o for o in namespaced if o["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["batch", "llm"]
    cluster_role = next(o for o in namespaced if o["kind"] == "ClusterRole")
    # Watching chosen namespaces: nothing namespaced is granted cluster-wide.
    assert {r["resources"][0] for r in cluster_role["rules"]} == {"customresourcedefinitions", "namespaces"}
    secrets = [r for r in NAMESPACED_RULES if "secrets" in r.resources]
    assert [r.verbs for r in secrets] == [("get",)]


def test_service_monitor_shape() -> None:
    monitor = by_name(objects_of(gpu()), "ServiceMonitor", "llama-8b")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"] == {
        "matchLabels": {"tokenfleet.dev/service": "llama-8b"},
        # The per-track Services list the same engine pods again: not scraped twice.
        "matchExpressions": [{"key": "tokenfleet.dev/track", "operator": "DoesNotExist"}],
    }
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert {k: v for k, v in endpoint.items() if k != "metricRelabelings"} == {
        "port": "http",
        "path": "/metrics",
        "interval": "15s",
        "scheme": "http",
    }
    # vLLM's series reach the rules and dashboards as `vllm:x` even when read as OpenMetrics
    # (`vllm_x`); Prometheus anchors the regex and expands $1 as below.
    (rename,) = endpoint["metricRelabelings"]
    assert rename["sourceLabels"] == ["__name__"]
    assert rename["targetLabel"] == "__name__"
    expand = rename["replacement"].replace("$1", r"\1")
    assert (
        re.sub(f"^(?:{rename['regex']})$", expand, "vllm_num_requests_running") == "vllm:num_requests_running"
    )
    assert re.fullmatch(rename["regex"], "tokenfleet_gateway_requests_total") is None
    # Both Services it selects carry the label and name their port "http".
    services = [
        o
        for o in objects_of(gpu())
        if o["kind"] == "Service" and "tokenfleet.dev/track" not in o["metadata"]["labels"]
    ]
    assert len(services) == 2
    for service in services:
        assert service["metadata"]["labels"]["tokenfleet.dev/service"] == "llama-8b"
        assert service["spec"]["ports"][0]["name"] == "http"


def cluster_engine_command(service: LLMService, traces: TraceExport | None = None) -> EngineCommand:
    """The engine argv the operator should render: the local fleet's, with the pod's paths and port."""
    return engine_command(
        service.spec,
        cluster_model_path(service.spec.model, Conventions()),
        port=8000,
        host="0.0.0.0",
        python="python3",
        traces=traces,
    )


def test_engine_pod_runs_the_local_fleet_argv_and_is_hardened() -> None:
    service = gpu()
    stable = by_name(objects_of(service), "Deployment", "llama-8b-engine")
    pod = stable["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    expected = cluster_engine_command(service)
    assert container["command"] == expected.argv
    assert {e["name"]: e["value"] for e in container["env"]}.items() >= expected.env.items()
    # Startup sized for model load (failover.startupTimeoutS), readiness and liveness on /health.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= service.spec.failover.startup_timeout_s
    assert startup["httpGet"]["path"] == "/v1/models"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # Drain: preStop sleep, then vLLM's --shutdown-timeout, inside the grace period.
    drain = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > drain + service.spec.engine.shutdown_timeout_s
    # GPU request, pool placement, restricted security context.
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    # The gateway outlives the engines' drain (a stream through it must finish).
    gateway = by_name(objects_of(service), "Deployment", "llama-8b-gateway")["spec"]["template"]["spec"]
    assert gateway["terminationGracePeriodSeconds"] >= pod["terminationGracePeriodSeconds"]


def test_gpu_pool_and_fallback_pool_placement() -> None:
    pools = [
        {
            "name": "h100",
            "nodeSelector": {"pool": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
        },
        {"name": "a100", "nodeSelector": {"pool": "a100"}, "gpuResource": "amd.com/gpu"},
    ]
    service = with_spec(gpu(), engine={"gpuPools": pools})
    first = by_name(objects_of(service), "Deployment", "llama-8b-engine")["spec"]["template"]["spec"]
    assert first["nodeSelector"] == {"pool": "h100"}
    assert first["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    fallback = objects_of(service, ControlDecision(stable_replicas=2, gpu_pool=1))
    pod = by_name(fallback, "Deployment", "llama-8b-engine")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]


def test_canary_deployment_only_during_a_canary() -> None:
    names = {
        o["metadata"]["name"]
        for o in objects_of(gpu(), ControlDecision(stable_replicas=3))
        if o["kind"] == "Deployment"
    }
    assert "llama-8b-engine-canary" not in names
    objects = objects_of(
        gpu(), ControlDecision(stable_replicas=3, canary_replicas=1, canary_weight_percent=25)
    )
    canary = by_name(objects, "Deployment", "llama-8b-engine-canary")
    stable = by_name(objects, "Deployment", "llama-8b-engine")
    assert canary["spec"]["replicas"] == 1
    assert stable["spec"]["replicas"] == 3
    # Disjoint selectors (a Deployment must own only its pods); one Service over both tracks.
    assert canary["spec"]["selector"]["matchLabels"]["tokenfleet.dev/track"] == "canary"
    assert stable["spec"]["selector"]["matchLabels"]["tokenfleet.dev/track"] == "stable"
    engines = by_name(objects, "Service", "llama-8b-engine")
    assert "tokenfleet.dev/track" not in engines["spec"]["selector"]


def test_network_policies_default_deny_then_only_the_needed_paths() -> None:
    objects = objects_of(gpu())
    deny = by_name(objects, "NetworkPolicy", "llama-8b-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"]
    assert "egress" not in deny["spec"]
    engine = by_name(objects, "NetworkPolicy", "llama-8b-engine")["spec"]
    (ingress,) = engine["ingress"]
    peers = ingress["from"]
    assert peers[0] == {
        "podSelector": {
            "matchLabels": {"tokenfleet.dev/service": "llama-8b", "tokenfleet.dev/component": "gateway"}
        }
    }
    assert peers[1]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert ingress["ports"] == [{"protocol": "TCP", "port": 8000}]
    # hf:// weights: HTTPS out, but not into the cluster's private ranges.
    https = [e for e in engine["egress"] if e["ports"] == [{"protocol": "TCP", "port": 443}]]
    assert https[0]["to"][0]["ipBlock"]["except"]
    builtin = objects_of(load_service(ROOT / "examples" / "default.yaml"))
    engine = by_name(builtin, "NetworkPolicy", "tiny-code-engine")["spec"]
    assert all(e["ports"][0]["port"] == 53 for e in engine["egress"]), "no egress but DNS"
    gateway = by_name(objects, "NetworkPolicy", "llama-8b-gateway")["spec"]
    assert gateway["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8000}]}]
    assert gateway["egress"][0]["ports"] == [{"protocol": "TCP", "port": 8000}]
    # endpoint discovery: the API server, on its Service port and its usual endpoint port
    assert gateway["egress"][1] == {
        "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
        "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}],
    }
    assert len(gateway["egress"]) == 3  # engines, API server, DNS: nothing else


COLLECTOR = "http://otel-collector-opentelemetry-collector.monitoring.svc:4318"  # what infra/ sets
CANARY = ControlDecision(stable_replicas=2, canary_replicas=1, canary_weight_percent=10)


def traced_objects(service: LLMService, environ: dict[str, str]) -> list[dict[str, Any]]:
    """Objects as an operator started with `environ` renders them (Conventions.from_env)."""
    return desired_objects(service, Observed(uid="uid-1"), CANARY, Conventions.from_env(environ))


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_without_a_collector_pods_export_no_traces_and_nothing_changes() -> None:
    service = gpu()
    objects = traced_objects(service, {})
    assert objects == objects_of(service, CANARY)  # the operator's defaults: no endpoint
    for name in ("llama-8b-engine", "llama-8b-engine-canary", "llama-8b-gateway"):
        (container,) = by_name(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert "--otlp-traces-endpoint" not in container["command"]
        assert not [key for key in env_of(container) if key.startswith("OTEL_")], name
    for name in ("llama-8b-engine", "llama-8b-gateway"):
        egress = by_name(objects, "NetworkPolicy", name)["spec"]["egress"]
        assert all(p["port"] != 4318 for rule in egress for p in rule["ports"])


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "TOKENFLEET_OTLP_ENDPOINT"])
def test_with_a_collector_gateway_and_engines_export_their_spans_there(variable: str) -> None:
    service = gpu()
    objects = traced_objects(service, {variable: COLLECTOR})
    for obj in objects:
        if obj["kind"] != "ServiceMonitor":
            assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION
    # Engines (both tracks): vLLM's --otlp-traces-endpoint, as the local fleet passes it.
    expected = cluster_engine_command(service, TraceExport.of_engines(COLLECTOR, "llama-8b"))
    for name in ("llama-8b-engine", "llama-8b-engine-canary"):
        (container,) = by_name(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert container["command"] == expected.argv
        env = env_of(container)
        assert env.items() >= expected.env.items()
        assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
        assert env["OTEL_SERVICE_NAME"] == "tokenfleet-engine-llama-8b"
    # The gateway: the variable engine/gateway/tracing.py switches OTLP export on with.
    (gateway,) = by_name(objects, "Deployment", "llama-8b-gateway")["spec"]["template"]["spec"]["containers"]
    assert env_of(gateway) == {
        "PYTHONSAFEPATH": "1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{COLLECTOR}/v1/traces",
    }
    # Their NetworkPolicies let the spans out: to the collector's namespace, on its port.
    to_collector = {
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"protocol": "TCP", "port": 4318}],
    }
    for name in ("llama-8b-engine", "llama-8b-gateway"):
        assert to_collector in by_name(objects, "NetworkPolicy", name)["spec"]["egress"], name
    # Nothing else differs from the objects rendered without a collector.
    untraced = {(o["kind"], o["metadata"]["name"]): o for o in traced_objects(service, {})}
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objects) == sorted(untraced)
    changed = {
        (o["kind"], o["metadata"]["name"]) for o in objects if untraced[o["kind"], o["metadata"]["name"]] != o
    }
    assert changed == {
        ("Deployment", "llama-8b-engine"),
        ("Deployment", "llama-8b-engine-canary"),
        ("Deployment", "llama-8b-gateway"),
        ("NetworkPolicy", "llama-8b-engine"),
        ("NetworkPolicy", "llama-8b-gateway"),
    }


def test_collector_endpoint_forms() -> None:
    from tokenfleet.operator.network import otlp_egress

    # Given with the /v1/traces path: never appended twice.
    objects = traced_objects(gpu(), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{COLLECTOR}/v1/traces"})
    (engine,) = by_name(objects, "Deployment", "llama-8b-engine")["spec"]["template"]["spec"]["containers"]
    argv = engine["command"]
    assert argv[argv.index("--otlp-traces-endpoint") + 1] == f"{COLLECTOR}/v1/traces"
    (gateway,) = by_name(objects, "Deployment", "llama-8b-gateway")["spec"]["template"]["spec"]["containers"]
    assert env_of(gateway)["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == f"{COLLECTOR}/v1/traces"
    # A Service name with the cluster domain: still its namespace; anything else: its port only.
    assert otlp_egress("http://otel.observability.svc.cluster.local:4318")["to"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}
    ]
    assert otlp_egress("https://traces.example.com/v1/traces") == {
        "ports": [{"protocol": "TCP", "port": 443}]
    }
    assert otlp_egress("http://10.1.2.3:4318") == {"ports": [{"protocol": "TCP", "port": 4318}]}


def test_the_operator_renders_traced_pods_without_opentelemetry_installed() -> None:
    """The operator's image has no OpenTelemetry SDK (the `operator` extra): the endpoint rules it
    shares with the gateway and the local fleet must not import it."""
    import json
    import subprocess
    import sys

    probe = f"""
import json, sys
sys.modules["opentelemetry"] = None  # any import of it fails
from tokenfleet.operator.model import Conventions, ControlDecision, Observed
from tokenfleet.operator.reconcile import desired_objects
from tokenfleet.spec import load_service
service = load_service({str(ROOT / "examples" / "gpu.yaml")!r})
conventions = Conventions.from_env({{"OTEL_EXPORTER_OTLP_ENDPOINT": {COLLECTOR!r}}})
objects = desired_objects(service, Observed(uid="u"), ControlDecision(stable_replicas=1), conventions)
engine = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-engine"))
print(json.dumps(engine["spec"]["template"]["spec"]["containers"][0]["command"]))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    argv = json.loads(done.stdout.strip().splitlines()[-1])
    assert argv[argv.index("--otlp-traces-endpoint") + 1] == f"{COLLECTOR}/v1/traces"


def test_gateway_discovers_engines_with_a_least_privilege_role() -> None:
    from tokenfleet.operator.model import revision_of
    from tokenfleet.operator.rbac import gateway_rules

    service = gpu()
    objects = objects_of(
        service, ControlDecision(stable_replicas=3, canary_replicas=1, canary_weight_percent=25)
    )
    gateway = by_name(objects, "Deployment", "llama-8b-gateway")
    pod = gateway["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert "--replica" not in command
    selector = command[command.index("--discover") + 1]
    assert selector == "tokenfleet.dev/component=engine,tokenfleet.dev/service=llama-8b,tokenfleet.dev/track"
    assert command[command.index("--weights-configmap") + 1] == "llama-8b-gateway"
    assert command[command.index("--namespace") + 1] == "llm"
    assert pod["serviceAccountName"] == "llama-8b-gateway"
    assert pod["automountServiceAccountToken"] is True
    account = by_name(objects, "ServiceAccount", "llama-8b-gateway")
    assert account["automountServiceAccountToken"] is False  # only the gateway's pods mount it
    role = by_name(objects, "Role", "llama-8b-gateway")
    assert role["metadata"]["namespace"] == "llm"
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "verbs": ["get", "watch"],
            "resourceNames": ["llama-8b-gateway"],
        },
    ]
    binding = by_name(objects, "RoleBinding", "llama-8b-gateway")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "llama-8b-gateway",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llama-8b-gateway", "namespace": "llm"}]
    # RBAC lets nobody grant what it does not hold: the operator holds every permission it grants.
    held = granted(rbac_manifests("tokenfleet-system"))
    for rule in gateway_rules(service):
        for resource in rule.resources:
            for verb in rule.verbs:
                assert (rule.api_group, resource, verb, None) in held, (resource, verb)
    # the headless per-track Services, labelled with the revision each track runs
    revision = revision_of(service.spec)
    for track in ("stable", "canary"):
        svc = by_name(objects, "Service", f"llama-8b-engine-{track}")
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"]["tokenfleet.dev/track"] == track
        assert svc["metadata"]["labels"]["tokenfleet.dev/track"] == track
        assert svc["metadata"]["labels"]["tokenfleet.dev/revision"] == revision


def test_gateway_configmap_carries_the_canary_weights() -> None:
    import json

    from tokenfleet.operator.model import revision_of

    service = gpu()
    old = with_spec(service, engine={"maxNumSeqs": 4})
    observed = Observed(uid="u", stable_spec=old.spec)
    canary = ControlDecision(stable_replicas=3, canary_replicas=1, canary_weight_percent=25)
    config = by_name(desired_objects(service, observed, canary), "ConfigMap", "llama-8b-gateway")
    weights = json.loads(config["data"]["weights.json"])
    assert weights == {revision_of(old.spec): 75, revision_of(service.spec): 25}
    idle = by_name(
        desired_objects(service, observed, ControlDecision(stable_replicas=3)),
        "ConfigMap",
        "llama-8b-gateway",
    )
    assert json.loads(idle["data"]["weights.json"]) == {}
    # rolled back: until the canary Deployment is gone, its pods get none of the traffic
    leaving = Observed(
        uid="u", stable_spec=old.spec, deployments={"llama-8b-engine-canary": DeploymentView()}
    )
    config = by_name(
        desired_objects(service, leaving, ControlDecision(stable_replicas=3)), "ConfigMap", "llama-8b-gateway"
    )
    assert json.loads(config["data"]["weights.json"]) == {revision_of(old.spec): 100}
    # the weights are followed at run time: they do not roll the gateway's pods
    hashes = {
        by_name(desired_objects(service, observed, d), "Deployment", "llama-8b-gateway")["spec"]["template"][
            "metadata"
        ]["annotations"]["tokenfleet.dev/config-hash"]
        for d in (canary, ControlDecision(stable_replicas=3))
    }
    assert len(hashes) == 1


def test_status_conditions_and_observed_generation() -> None:
    service = gpu()
    decision = ControlDecision(stable_replicas=2)
    views = {
        "llama-8b-engine": DeploymentView(
            replicas=2, ready_replicas=2, updated_replicas=2, generation=3, observed_generation=3
        ),
        "llama-8b-gateway": DeploymentView(
            replicas=1, ready_replicas=1, updated_replicas=1, generation=1, observed_generation=1
        ),
    }
    keys = ApiKeysView(name="llama-8b-api-keys", found=True, digest="d", tenants=frozenset({"search"}))
    status = desired_status(
        service, Observed(uid="u", generation=7, deployments=views, api_keys=keys), decision, (), NOW
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["observedGeneration"] == 7
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("True", "AllReplicasReady")
    assert (conditions["Progressing"]["status"], conditions["Progressing"]["reason"]) == (
        "False",
        "RolloutComplete",
    )
    assert (conditions["Degraded"]["status"], conditions["Degraded"]["reason"]) == ("False", "AsExpected")
    assert status["phase"] == "Ready"
    # A later status keeps lastTransitionTime while a condition's status does not flip.
    later = desired_status(
        service,
        Observed(uid="u", generation=7, deployments=views, api_keys=keys),
        decision,
        status["conditions"],
        "2027-01-01T00:00:00Z",
    )
    assert later["conditions"] == status["conditions"]
    rolled_back = ControlDecision(
        stable_replicas=2, phase="RolledBack", reasons=("canary rolled back at 50%: error rate 9.0%",)
    )
    status = desired_status(
        service, Observed(uid="u", deployments=views, api_keys=keys), rolled_back, (), NOW
    )
    degraded = {c["type"]: c for c in status["conditions"]}["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "CanaryRolledBack")
    assert "error rate 9.0%" in degraded["message"]


def _ready(name: str, n: int) -> DeploymentView:
    return DeploymentView(
        replicas=n, ready_replicas=n, updated_replicas=n, generation=1, observed_generation=1
    )


def test_control_tick_canary_rolls_back_on_errors_and_keeps_the_stable_spec() -> None:
    service = with_spec(gpu(), autoscaling={"enabled": False}, rollout={"canarySteps": [50, 100]})
    state = ControlState.from_status(None, service.spec)
    stable_rev = state.rollout.stable
    changed = with_spec(service, engine={"maxNumSeqs": 64})
    new_rev = revision_of(changed.spec)
    observed = Observed(uid="u", deployments={"llama-8b-engine": _ready("s", 2)})
    decision, state, events = control_tick(changed, observed, state, None, now=0.0)
    assert decision.phase == "Progressing"
    assert (decision.stable_replicas, decision.canary_replicas) == (2, 1)
    assert any("canary rollout of" in e for e in events)
    assert stable_spec_of(state, changed.spec) == service.spec  # the stable track keeps the old spec
    views = {"llama-8b-engine": _ready("s", 2), "llama-8b-engine-canary": _ready("c", 1)}
    observed = Observed(uid="u", deployments=views)
    decision, state, _ = control_tick(changed, observed, state, None, now=10.0)
    assert decision.canary_weight_percent == 50
    bad = Metrics(Signals(), {stable_rev: WindowStats(100, 0), new_rev: WindowStats(40, 10)})
    decision, state, events = control_tick(changed, observed, state, bad, now=20.0)
    assert decision.phase == "RolledBack"
    assert decision.canary_replicas == 0
    assert any("rolled back" in e for e in events)
    assert state.rollout.stable == stable_rev
    assert stable_spec_of(state, changed.spec) == service.spec
    # later ticks over the same spec: the rejected revision is not rolled out again
    decision, state, events = control_tick(changed, observed, state, None, now=30.0)
    assert (decision.phase, decision.canary_replicas, events) == ("RolledBack", 0, [])
    assert stable_spec_of(state, changed.spec) == service.spec
    # the old spec applied again: back to normal, no canary
    decision, back, events = control_tick(service, observed, state, None, now=35.0)
    assert (decision.phase, decision.canary_replicas) == ("Stable", 0)
    assert events == [f"spec back on {stable_rev}"]
    assert back.rollout.rejected == {new_rev}
    # a new revision starts a new canary
    newer = with_spec(service, engine={"maxNumSeqs": 32})
    decision, state, events = control_tick(newer, observed, state, None, now=40.0)
    assert decision.phase == "Progressing"
    assert any("canary rollout of" in e for e in events)


def test_control_tick_rolling_is_left_to_the_deployment() -> None:
    service = with_spec(gpu(), autoscaling={"enabled": False}, rollout={"strategy": "rolling"})
    state = ControlState.from_status(None, service.spec)
    changed = with_spec(service, engine={"maxNumSeqs": 64})
    decision, state, events = control_tick(changed, Observed(uid="u"), state, None, now=0.0)
    assert decision.canary_replicas == 0
    assert state.rollout.stable == revision_of(changed.spec)
    assert stable_spec_of(state, changed.spec) is None  # the stable Deployment gets the new template
    assert events == [f"rolling update to {revision_of(changed.spec)}"]


def test_control_tick_autoscales_on_queue_depth() -> None:
    service = with_spec(gpu(), rollout={"strategy": "rolling"})  # autoscaling on: queue_depth target 8
    state = ControlState.from_status(None, service.spec)
    state = ControlState(rollout=state.rollout, stable_spec=state.stable_spec, desired=2)
    views = {"llama-8b-engine": _ready("s", 2)}
    busy = Metrics(Signals(gateway_queued=80))
    decision, state, _ = control_tick(service, Observed(uid="u", deployments=views), state, busy, now=0.0)
    for tick in range(1, 5):  # past scaleUpStabilizationS (15 s)
        decision, state, _events = control_tick(
            service, Observed(uid="u", deployments=views), state, busy, now=tick * 10.0
        )
    assert decision.stable_replicas > 2
    assert decision.stable_replicas <= service.spec.replicas.max
    # State survives a round trip through status (an operator restart).
    restored = ControlState.from_status(state.to_status(), service.spec)
    assert restored.desired == state.desired
    assert restored.scale.history == state.scale.history


def test_startup_budget_follows_failover_startup_timeout() -> None:
    service = with_spec(gpu(), failover={"startupTimeoutS": 1800})
    container = by_name(objects_of(service), "Deployment", "llama-8b-engine")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["startupProbe"]["failureThreshold"] == math.ceil(1800 / 10)


def test_gateway_metrics_become_signals() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from tokenfleet.engine.gateway.metrics import GatewayMetrics
    from tokenfleet.operator.metrics import signals_from_text

    metrics = GatewayMetrics(registry=CollectorRegistry())
    metrics.queued.labels("interactive").set(3)
    metrics.queued.labels("batch").set(4)
    text = generate_latest(metrics.registry).decode()
    assert signals_from_text(text).gateway_queued == 7


def test_pending_engine_pods_fall_back_to_the_next_gpu_pool() -> None:
    from tokenfleet.operator.handlers import pending_pods
    from tokenfleet.operator.model import PodView

    pools = [
        {"name": "h100", "nodeSelector": {"pool": "h100"}},
        {"name": "a100", "nodeSelector": {"pool": "a100"}},
    ]
    service = with_spec(gpu(), engine={"gpuPools": pools}, failover={"pendingTimeoutS": 300})
    state = ControlState.from_status(None, service.spec)
    waiting = Observed(uid="u", pending_pods=(PodView("llama-8b-engine-x", pending_since=1000.0, pool=0),))
    decision, state, events = control_tick(service, waiting, state, None, now=1200.0)
    assert decision.gpu_pool == 0, "not yet past pendingTimeoutS"
    decision, state, events = control_tick(service, waiting, state, None, now=1301.0)
    assert decision.gpu_pool == 1
    assert any("falling back to pool 1" in e for e in events)
    assert ControlState.from_status(state.to_status(), service.spec).gpu_pool == 1
    # The next tick keeps the pool, and the Deployment lands there.
    decision, state, _ = control_tick(service, Observed(uid="u"), state, None, now=1400.0)
    assert decision.gpu_pool == 1
    pod = by_name(objects_of(service, decision), "Deployment", "llama-8b-engine")["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"pool": "a100"}
    assert pod["metadata"]["labels"]["tokenfleet.dev/gpu-pool"] == "1"
    # Pods as the API returns them: only unscheduled Pending ones count, with their creation time.
    items: list[dict[str, Any]] = [
        {
            "metadata": {
                "name": "a",
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"tokenfleet.dev/gpu-pool": "0"},
            },
            "status": {"phase": "Pending"},
        },
        {
            "metadata": {"name": "b", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Running"},
        },
        {
            "metadata": {"name": "c", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Pending", "hostIP": "10.0.0.1"},
        },
    ]
    assert pending_pods(items) == (PodView("a", 1767225600.0, 0),)
