"""Services, PodDisruptionBudgets, NetworkPolicies and the ServiceMonitor of one LLMService.

Network policy: deny everything for the service's pods, then allow only clients → gateway,
gateway → engines, gateway → the API server (endpoint discovery), Prometheus → the metrics
ports, and DNS (plus HTTPS out of engines whose model comes from a hub, and OTLP to the trace
collector when the operator has one).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from tokenfleet.observability.stack import VLLM_NAMES
from tokenfleet.operator.model import (
    COMPONENT_LABEL,
    ENGINE_PORT,
    REVISION_LABEL,
    SERVICE_LABEL,
    TRACK_LABEL,
    Conventions,
    Track,
)
from tokenfleet.operator.workloads import common_labels, gateway_name
from tokenfleet.spec import LLMService

# The local stack's rename of vLLM's series, in the Prometheus Operator's spelling: a Prometheus
# that negotiates OpenMetrics reads `vllm:x` as `vllm_x`; the dashboards and rules query `vllm:x`.
VLLM_METRIC_NAMES = {
    "sourceLabels": VLLM_NAMES["source_labels"],
    "regex": VLLM_NAMES["regex"],
    "targetLabel": VLLM_NAMES["target_label"],
    "replacement": VLLM_NAMES["replacement"],
    "action": "replace",
}


def _meta(service: LLMService, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": service.metadata.namespace,
        "labels": common_labels(service, component),
    }


def _selector(service: LLMService, component: str | None = None) -> dict[str, str]:
    labels = {SERVICE_LABEL: service.metadata.name}
    if component is not None:
        labels[COMPONENT_LABEL] = component
    return labels


def engine_service(service: LLMService) -> dict[str, Any]:
    # Selects both tracks: during a canary the canary's share of pods is its share of traffic.
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(service, f"{service.metadata.name}-engine", "engine"),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(service, "engine"),
            "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def track_service_name(service: LLMService, track: Track) -> str:
    return f"{service.metadata.name}-engine-{track}"


def engine_track_service(service: LLMService, track: Track, revision: str) -> dict[str, Any]:
    """A headless Service per track, labelled with the revision it runs: Kubernetes copies the
    labels onto its EndpointSlices, which is how the gateway learns each pod's revision."""
    meta = _meta(service, track_service_name(service, track), "engine")
    meta["labels"].update({TRACK_LABEL: track, REVISION_LABEL: revision})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "selector": {**_selector(service, "engine"), TRACK_LABEL: track},
            "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def gateway_service(service: LLMService) -> dict[str, Any]:
    port = service.spec.gateway.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(service, service.metadata.name, "gateway"),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(service, "gateway"),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budgets(service: LLMService) -> list[dict[str, Any]]:
    # maxUnavailable (not minAvailable): a one-replica service must not block node drains forever.
    return [
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(service, name, component),
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": _selector(service, component)},
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        }
        for name, component in (
            (f"{service.metadata.name}-engine", "engine"),
            (gateway_name(service), "gateway"),
        )
    ]


def _dns_egress() -> dict[str, Any]:
    return {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
        ],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }


def _prometheus_peer(conventions: Conventions) -> dict[str, Any]:
    return {
        "namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": conventions.prometheus_namespace}
        },
        "podSelector": {"matchLabels": dict(conventions.prometheus_pod_labels)},
    }


def otlp_egress(endpoint: str) -> dict[str, Any]:
    """Spans out to the collector at `endpoint`: its port, in its namespace when the host is a
    Service name (`<service>.<namespace>.svc[.<cluster domain>]`), else to any address.

    NetworkPolicy sees the pod's port after the Service's DNAT: this assumes the collector serves
    on the port its Service exposes (4318 for the one infra/ installs).
    """
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    ports = [{"protocol": "TCP", "port": port}]
    host = (url.hostname or "").split(".")
    if len(host) >= 3 and host[2] == "svc":
        namespace = {"matchLabels": {"kubernetes.io/metadata.name": host[1]}}
        return {"to": [{"namespaceSelector": namespace}], "ports": ports}
    return {"ports": ports}


def _tracing_egress(conventions: Conventions) -> list[dict[str, Any]]:
    return [otlp_egress(conventions.otlp_endpoint)] if conventions.otlp_endpoint else []


def network_policies(service: LLMService, conventions: Conventions) -> list[dict[str, Any]]:
    name = service.metadata.name
    gateway_port = service.spec.gateway.port
    deny = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(service, f"{name}-default-deny", "network"),
        "spec": {"podSelector": {"matchLabels": _selector(service)}, "policyTypes": ["Ingress", "Egress"]},
    }
    engine_egress = [_dns_egress()]
    if service.spec.model.source.startswith("hf://"):
        # Weights are downloaded at start: HTTPS out, but never to in-cluster addresses.
        engine_egress.append(
            {
                "to": [
                    {
                        "ipBlock": {
                            "cidr": "0.0.0.0/0",
                            "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
                        }
                    }
                ],
                "ports": [{"protocol": "TCP", "port": 443}],
            }
        )
    engine_egress += _tracing_egress(conventions)
    engines = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(service, f"{name}-engine", "network"),
        "spec": {
            "podSelector": {"matchLabels": _selector(service, "engine")},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [
                        {"podSelector": {"matchLabels": _selector(service, "gateway")}},
                        # vLLM serves /metrics on its API port: NetworkPolicy is L4, so Prometheus
                        # reaches the port, and the gateway stays the only client of the API.
                        _prometheus_peer(conventions),
                    ],
                    "ports": [{"protocol": "TCP", "port": ENGINE_PORT}],
                }
            ],
            "egress": engine_egress,
        },
    }
    gateway = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(service, f"{name}-gateway", "network"),
        "spec": {
            "podSelector": {"matchLabels": _selector(service, "gateway")},
            "policyTypes": ["Ingress", "Egress"],
            # Clients (and Prometheus for /metrics) come from anywhere, but only to the gateway port.
            "ingress": [{"ports": [{"protocol": "TCP", "port": gateway_port}]}],
            "egress": [
                {
                    "to": [{"podSelector": {"matchLabels": _selector(service, "engine")}}],
                    "ports": [{"protocol": "TCP", "port": ENGINE_PORT}],
                },
                # Endpoint discovery: the API server's Service port (443) and, after kube-proxy's
                # DNAT, which most CNIs see, its usual endpoint port (6443).
                {
                    "to": [{"ipBlock": {"cidr": conventions.api_server_cidr}}],
                    "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}],
                },
                _dns_egress(),
                *_tracing_egress(conventions),
            ],
        },
    }
    return [deny, engines, gateway]


def service_monitor(service: LLMService) -> dict[str, Any]:
    """Prometheus Operator scrape config for the engines' and the gateway's /metrics (the per-track
    Services are left out: they list the same engine pods again)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(service, service.metadata.name, "monitoring"),
        "spec": {
            "selector": {
                "matchLabels": _selector(service),
                "matchExpressions": [{"key": TRACK_LABEL, "operator": "DoesNotExist"}],
            },
            "namespaceSelector": {"matchNames": [service.metadata.namespace]},
            "endpoints": [
                {
                    "port": "http",
                    "path": "/metrics",
                    "interval": "15s",
                    "scheme": "http",
                    "metricRelabelings": [VLLM_METRIC_NAMES],
                }
            ],
        },
    }
