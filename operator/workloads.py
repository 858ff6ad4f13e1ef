"""Engine and gateway Deployments (and the gateway's ConfigMap) for one LLMService.

The engine container runs exactly the argv `tokenfleet.engine.launch.engine_command` gives the
local fleet, so one spec means one vLLM command line in both places.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import yaml

from tokenfleet.engine.launch import engine_command
from tokenfleet.observability.otlp_endpoint import TraceExport, otlp_traces_url
from tokenfleet.operator.model import (
    COMPONENT_LABEL,
    ENGINE_PORT,
    MANAGED_BY,
    POOL_LABEL,
    REVISION_LABEL,
    SERVICE_LABEL,
    TRACK_LABEL,
    ApiKeysView,
    Conventions,
    Track,
    engine_tracks_selector,
    revision_of,
)
from tokenfleet.spec import LLMService, LLMServiceSpec, ModelSpec

KEYS_DIR = "/etc/tokenfleet/keys"
KEYS_FILE = "keys.yaml"  # the Secret entry the gateway reads (engine/gateway/tenancy.py)
CONFIG_DIR = "/etc/tokenfleet/config"
SERVICE_FILE = "service.yaml"
WEIGHTS_FILE = "weights.json"  # read by the gateway through the API (engine/gateway/discovery.py)
PROBE_PERIOD_S = 10
VLLM_EXIT_MARGIN_S = 15  # vLLM's own teardown after its drain (engine core, workers)
RUN_AS = 10001  # the non-root uid every tokenfleet image creates (images/*.Dockerfile)


def common_labels(service: LLMService, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": f"tokenfleet-{component}",
        "app.kubernetes.io/instance": service.metadata.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        SERVICE_LABEL: service.metadata.name,
        COMPONENT_LABEL: component,
    }


def engine_name(service: LLMService, track: Track) -> str:
    base = f"{service.metadata.name}-engine"
    return base if track == "stable" else f"{base}-canary"


def gateway_name(service: LLMService) -> str:
    return f"{service.metadata.name}-gateway"


def cluster_model_path(model: ModelSpec, conventions: Conventions) -> str:
    """What `--model` is inside an engine pod: a hub id, a baked-in builtin, or an image path."""
    source = model.source
    if source.startswith("hf://"):
        return source.removeprefix("hf://").split("@", 1)[0]
    if source.startswith("builtin://"):
        return f"{conventions.builtin_models_dir}/{source.removeprefix('builtin://')}"
    return source


def startup_budget_s(spec: LLMServiceSpec) -> int:
    """How long a replica may take to load its model before Kubernetes restarts it.

    The spec's failover.startupTimeoutS is the same budget the local fleet gives a process, so
    the startup probe gives up exactly when the control loop would.
    """
    return math.ceil(spec.failover.startup_timeout_s)


def termination_grace_s(spec: LLMServiceSpec, conventions: Conventions) -> int:
    # preStop sleep, then vLLM drains for --shutdown-timeout, then it tears down.
    return conventions.drain_s + spec.engine.shutdown_timeout_s + VLLM_EXIT_MARGIN_S


def restricted_container_security() -> dict[str, Any]:
    """What Pod Security `restricted` demands, plus a read-only root filesystem (one definition
    for the operator's pods and the ones the Pulumi program creates)."""
    return {
        "runAsNonRoot": True,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _engine_resources(spec: LLMServiceSpec) -> dict[str, Any]:
    engine = spec.engine
    if engine.device == "gpu":
        gpu = spec.engine.gpu_pools[0].gpu_resource if engine.gpu_pools else "nvidia.com/gpu"
        memory = f"{16 * engine.gpus_per_replica}Gi"
        requests = {
            "cpu": str(4 * engine.gpus_per_replica),
            "memory": memory,
            gpu: str(engine.gpus_per_replica),
        }
        # No CPU limit: throttling a tokenizer or scheduler thread stalls the GPU.
        return {"requests": requests, "limits": {"memory": memory, gpu: str(engine.gpus_per_replica)}}
    memory = f"{math.ceil(engine.kv_cache_gib) + 4}Gi"  # KV cache + weights + Python
    return {"requests": {"cpu": "2", "memory": memory}, "limits": {"memory": memory}}


def _pool_placement(spec: LLMServiceSpec, pool_index: int) -> dict[str, Any]:
    engine = spec.engine
    if engine.device != "gpu":
        return {}
    if not engine.gpu_pools:
        # No pool named: any node with the device plugin's GPUs, tolerating its usual taint.
        return {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    pool = engine.gpu_pools[min(pool_index, len(engine.gpu_pools) - 1)]
    placement: dict[str, Any] = {}
    if pool.node_selector:
        placement["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        placement["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in pool.tolerations]
    return placement


def _pool_resources(spec: LLMServiceSpec, pool_index: int) -> dict[str, Any]:
    resources = _engine_resources(spec)
    engine = spec.engine
    if engine.device == "gpu" and engine.gpu_pools:
        pool = engine.gpu_pools[min(pool_index, len(engine.gpu_pools) - 1)]
        default = engine.gpu_pools[0].gpu_resource
        for part in ("requests", "limits"):
            count = resources[part].pop(default)
            resources[part][pool.gpu_resource] = count
    return resources


def gateway_tracing_env(conventions: Conventions) -> dict[str, str]:
    """What turns on a gateway pod's OTLP export (engine/gateway/tracing.py): nothing without a
    collector, so the gateway keeps its spans in memory as it does locally."""
    if not conventions.otlp_endpoint:
        return {}
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": conventions.otlp_endpoint,
        # The exporter appends /v1/traces to the variable above but takes this one as it is, so an
        # endpoint configured with the path works too.
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp_traces_url(conventions.otlp_endpoint),
    }


def engine_container(
    service: LLMService, spec: LLMServiceSpec, conventions: Conventions, pool_index: int
) -> dict[str, Any]:
    endpoint = conventions.otlp_endpoint
    command = engine_command(
        spec,
        cluster_model_path(spec.model, conventions),
        port=ENGINE_PORT,
        host="0.0.0.0",
        python="python3",
        # With a collector, vLLM exports a span per request under the gateway's traceparent.
        traces=TraceExport.of_engines(endpoint, service.metadata.name) if endpoint else None,
    )
    env = {
        **command.env,
        # Read-only root filesystem: every cache goes to the writable emptyDir.
        "HOME": "/tmp",
        "HF_HOME": "/cache/huggingface",
        "XDG_CACHE_HOME": "/cache",
        "VLLM_CACHE_ROOT": "/cache/vllm",
    }
    startup_failures = max(1, math.ceil(startup_budget_s(spec) / PROBE_PERIOD_S))
    env_list: list[dict[str, Any]] = [{"name": key, "value": value} for key, value in sorted(env.items())]
    if spec.model.source.startswith("hf://") and conventions.hf_token_secret:
        # Gated hub models: the token comes from a Secret by reference, never in the manifest.
        secret, _, key = conventions.hf_token_secret.partition("/")
        ref = {"name": secret, "key": key or "token", "optional": True}
        env_list.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    return {
        "name": "engine",
        "image": spec.engine.image,
        "command": command.argv,
        "env": env_list,
        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        # /v1/models answers only once the weights are loaded (/health can go 200 earlier).
        "startupProbe": {
            "httpGet": {"path": "/v1/models", "port": "http"},
            "periodSeconds": PROBE_PERIOD_S,
            "timeoutSeconds": 5,
            "failureThreshold": startup_failures,
        },
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        # Lenient: a long prefill must not get a live engine killed; a dead engine core exits anyway.
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": PROBE_PERIOD_S,
            "timeoutSeconds": 5,
            "failureThreshold": max(1, math.ceil(spec.failover.unhealthy_after_s / PROBE_PERIOD_S)),
        },
        # Endpoint removal races SIGTERM: keep serving until every proxy has stopped routing here.
        "lifecycle": {"preStop": {"sleep": {"seconds": conventions.drain_s}}},
        "resources": _pool_resources(spec, pool_index),
        "securityContext": restricted_container_security(),
        "volumeMounts": [
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }


def engine_deployment(
    service: LLMService,
    spec: LLMServiceSpec,
    track: Track,
    replicas: int,
    conventions: Conventions,
    pool_index: int = 0,
) -> dict[str, Any]:
    """One engine Deployment: `spec` is the revision this track runs (stable or canary)."""
    revision = revision_of(spec)
    selector = {**common_labels(service, "engine"), TRACK_LABEL: track}
    selector = {key: selector[key] for key in (SERVICE_LABEL, COMPONENT_LABEL, TRACK_LABEL)}
    pod_labels = {
        **common_labels(service, "engine"),
        TRACK_LABEL: track,
        REVISION_LABEL: revision,
        POOL_LABEL: str(pool_index),
    }
    rollout = spec.rollout
    if rollout.strategy == "recreate":
        strategy: dict[str, Any] = {"type": "Recreate"}
    else:
        strategy = {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": rollout.max_surge, "maxUnavailable": rollout.max_unavailable},
        }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": "default",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_s(spec, conventions),
        "securityContext": restricted_pod_security(),
        "containers": [engine_container(service, spec, conventions, pool_index)],
        "volumes": [
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            # vLLM's workers share tensors through /dev/shm; the runtime's 64 MiB default is too small.
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
        ],
        **_pool_placement(spec, pool_index),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": engine_name(service, track),
            "namespace": service.metadata.namespace,
            "labels": {**common_labels(service, "engine"), TRACK_LABEL: track, REVISION_LABEL: revision},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "strategy": strategy,
            # A slow model load is not a stuck rollout.
            "progressDeadlineSeconds": startup_budget_s(spec) + 300,
            "revisionHistoryLimit": 3,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def gateway_service_document(service: LLMService) -> dict[str, Any]:
    """The LLMService the gateway loads: keys come from the mounted Secret file."""
    gateway = service.spec.gateway
    if gateway.api_keys_secret:
        gateway = gateway.model_copy(
            update={"api_keys_file": f"{KEYS_DIR}/{KEYS_FILE}", "api_keys_secret": None}
        )
    spec = service.spec.model_copy(update={"gateway": gateway})
    return {
        "apiVersion": service.api_version,
        "kind": service.kind,
        "metadata": {"name": service.metadata.name, "namespace": service.metadata.namespace},
        "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def gateway_configmap(service: LLMService, weights: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The service YAML the gateway loads at start, and the traffic weight of each revision
    (`{}`: no canary, every replica alike), which it follows at run time."""
    text = yaml.safe_dump(gateway_service_document(service), sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": gateway_name(service),
            "namespace": service.metadata.namespace,
            "labels": common_labels(service, "gateway"),
        },
        "data": {SERVICE_FILE: text, WEIGHTS_FILE: json.dumps(dict(weights or {}), sort_keys=True)},
    }


def gateway_deployment(
    service: LLMService, conventions: Conventions, api_keys: ApiKeysView | None
) -> dict[str, Any]:
    spec = service.spec
    port = spec.gateway.port
    labels = common_labels(service, "gateway")
    selector = {key: labels[key] for key in (SERVICE_LABEL, COMPONENT_LABEL)}
    config_text = gateway_configmap(service)["data"][SERVICE_FILE]
    # The gateway reads its config and keys once at start: a change must roll its pods (the
    # weights are followed through the API instead, so they are not part of the hash).
    annotations = {"tokenfleet.dev/config-hash": hashlib.sha256(config_text.encode()).hexdigest()[:16]}
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": gateway_name(service)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if spec.gateway.api_keys_secret:
        if api_keys is not None and api_keys.digest:
            annotations["tokenfleet.dev/api-keys-hash"] = api_keys.digest
        mounts.append({"name": "api-keys", "mountPath": KEYS_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "api-keys",
                "secret": {
                    "secretName": spec.gateway.api_keys_secret,
                    "items": [{"key": KEYS_FILE, "path": KEYS_FILE}],
                },
            }
        )
    container = {
        "name": "gateway",
        "image": conventions.gateway_image,
        "command": [
            "python3",
            "-m",
            "tokenfleet.engine.gateway",
            "-f",
            f"{CONFIG_DIR}/{SERVICE_FILE}",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            # Engine pods per track and the canary weights, watched through the API (discovery.py).
            "--discover",
            engine_tracks_selector(service),
            "--weights-configmap",
            gateway_name(service),
            "--namespace",
            service.metadata.namespace,
        ],
        "env": [
            {"name": name, "value": value}
            for name, value in sorted({"PYTHONSAFEPATH": "1", **gateway_tracing_env(conventions)}.items())
        ],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "lifecycle": {"preStop": {"sleep": {"seconds": conventions.drain_s}}},
        "resources": {
            "requests": {"cpu": "500m", "memory": "256Mi"},
            "limits": {"memory": "1Gi"},
        },
        "securityContext": restricted_container_security(),
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": gateway_name(service),
            "namespace": service.metadata.namespace,
            "labels": labels,
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            # Never zero gateways: the new pod is ready before the old one drains.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {
                    # Its own ServiceAccount: a token that may only read the engine slices and its
                    # ConfigMap (rbac.gateway_rbac_manifests).
                    "serviceAccountName": gateway_name(service),
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": False,
                    # A stream in flight through the gateway must outlive the engine's drain.
                    "terminationGracePeriodSeconds": termination_grace_s(spec, conventions),
                    "securityContext": restricted_pod_security(),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
