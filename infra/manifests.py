"""Kubernetes objects the Pulumi program creates, as plain manifest dicts (pure functions).

Plain dicts, not Pulumi arg classes, so the same objects are checked by kubernetes-validate and
by the policy tests (non-root, probes, pinned images) without a cluster; `kube.apply()` turns each
into a typed pulumi-kubernetes resource. Labels follow app.kubernetes.io conventions.
"""

from __future__ import annotations

import json
from typing import Any

from tokenfleet.operator.workloads import restricted_container_security, restricted_pod_security

PART_OF = "tokenfleet"
PSS_LABELS = ("enforce", "audit", "warn")
DASHBOARD_LABEL = "grafana_dashboard"  # kube-prometheus-stack's Grafana sidecar default label


def labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": "pulumi",
    }


def namespace(name: str, pod_security: str = "restricted") -> dict[str, Any]:
    """A namespace with Pod Security Admission labels (enforce, audit and warn at one level)."""
    pss = {f"pod-security.kubernetes.io/{mode}": pod_security for mode in PSS_LABELS}
    pss["pod-security.kubernetes.io/enforce-version"] = "latest"
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {**pss, "app.kubernetes.io/part-of": PART_OF}},
    }


# --- NetworkPolicies -------------------------------------------------------------------------


def _ns_peer(name: str) -> dict[str, Any]:
    # kubernetes.io/metadata.name is set by the API server on every namespace (1.22+).
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def default_deny(ns: str) -> dict[str, Any]:
    """Nothing in or out of any pod of the namespace unless another policy allows it."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "default-deny", "namespace": ns, "labels": labels("default-deny", "network")},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }


def allow_dns(ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow-dns", "namespace": ns, "labels": labels("allow-dns", "network")},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [_ns_peer("kube-system")],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                }
            ],
        },
    }


def allow_otlp_egress(ns: str, monitoring_ns: str) -> dict[str, Any]:
    """Traces from every tokenfleet pod to the OpenTelemetry collector (OTLP gRPC and HTTP)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow-otlp", "namespace": ns, "labels": labels("allow-otlp", "network")},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [_ns_peer(monitoring_ns)],
                    "ports": [{"protocol": "TCP", "port": 4317}, {"protocol": "TCP", "port": 4318}],
                }
            ],
        },
    }


def operator_policy(
    ns: str,
    pod_labels: dict[str, str],
    metrics_port: int,
    monitoring_ns: str,
    service_namespaces: list[str],
    service_ports: list[int],
) -> dict[str, Any]:
    """The operator: API server (443/6443, not a pod, so no selector), Prometheus and the
    services' metrics endpoints (its control loop reads them); scraped from `monitoring`."""
    egress: list[dict[str, Any]] = [
        {"ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]},
        {"to": [_ns_peer(monitoring_ns)], "ports": [{"protocol": "TCP", "port": 9090}]},
    ]
    if service_namespaces:
        egress.append(
            {
                "to": [_ns_peer(n) for n in service_namespaces],
                "ports": [{"protocol": "TCP", "port": p} for p in sorted(set(service_ports))],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "tokenfleet-operator", "namespace": ns, "labels": labels("operator", "network")},
        "spec": {
            "podSelector": {"matchLabels": pod_labels},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [_ns_peer(monitoring_ns)], "ports": [{"protocol": "TCP", "port": metrics_port}]}
            ],
            "egress": egress,
        },
    }


def load_policy(ns: str, target_ns: str, target_port: int, master_port: int, ui_port: int) -> dict[str, Any]:
    """Locust: workers <-> master inside the namespace, and out to the target's gateway only."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "locust", "namespace": ns, "labels": labels("locust", "network")},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            # The UI is reached by `kubectl port-forward`, which enters through the kubelet, not the
            # pod network: no ingress from other namespaces is needed for it.
            "ingress": [
                {"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": master_port}]},
                {"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": ui_port}]},
            ],
            "egress": [
                {"to": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": master_port}]},
                {"to": [_ns_peer(target_ns)], "ports": [{"protocol": "TCP", "port": target_port}]},
            ],
        },
    }


# --- Operator --------------------------------------------------------------------------------


def operator_deployment(
    *,
    ns: str,
    image: str,
    service_account: str,
    watch_namespaces: list[str],
    env: dict[str, str],
    health_port: int,
    metrics_port: int,
    log_level: str,
) -> dict[str, Any]:
    """One replica, Recreate: two kopf operators of the same priority freeze each other."""
    pod_labels = labels("tokenfleet-operator", "operator")
    # kopf's own flags (--liveness, --namespace) plus the port of the operator's metrics.
    args = [
        "operator",
        "run",
        f"--metrics-port={metrics_port}",
        f"--liveness=http://0.0.0.0:{health_port}/healthz",
    ]
    args += [f"--namespace={watched}" for watched in watch_namespaces]
    env = {**env, "TOKENFLEET_LOG_LEVEL": log_level}
    probe = {"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 10, "timeoutSeconds": 5}
    container = {
        "name": "operator",
        "image": image,
        "command": ["tokenfleet"],
        "args": args,
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())]
        + [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
        "ports": [
            {"name": "health", "containerPort": health_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"},
        ],
        "startupProbe": {**probe, "failureThreshold": 30},
        "livenessProbe": {**probe, "failureThreshold": 3},
        # Nothing routes to the operator; readiness only shows in `kubectl get` whether it is up.
        "readinessProbe": {**probe, "failureThreshold": 1},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": restricted_container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "tokenfleet-operator", "namespace": ns, "labels": pod_labels},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app.kubernetes.io/name": "tokenfleet-operator"}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "serviceAccountName": service_account,
                    "securityContext": restricted_pod_security(),
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                },
            },
        },
    }


def metrics_service(ns: str, name: str, selector: dict[str, str], port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {**labels(name, "metrics")}},
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }


def service_monitor(ns: str, name: str, match_labels: dict[str, str], release: str) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {**labels(name, "metrics"), "release": release},
        },
        "spec": {
            "selector": {"matchLabels": match_labels},
            "namespaceSelector": {"matchNames": [ns]},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


# --- Monitoring ------------------------------------------------------------------------------


def dashboard_configmap(ns: str, name: str, dashboard: dict[str, Any]) -> dict[str, Any]:
    """One dashboard per ConfigMap: Grafana's sidecar loads every ConfigMap with the label."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"tokenfleet-dashboard-{name}",
            "namespace": ns,
            "labels": {**labels(f"dashboard-{name}", "dashboard"), DASHBOARD_LABEL: "1"},
            "annotations": {"grafana_folder": "tokenfleet"},
        },
        "data": {f"tokenfleet-{name}.json": json.dumps(dashboard, sort_keys=True)},
    }


def opaque_secret(ns: str, name: str, component: str, key: str) -> dict[str, Any]:
    """A Secret skeleton; its value is set from a Pulumi secret Output by the caller."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, "labels": labels(name, component)},
        "type": "Opaque",
        "stringData": {key: ""},
    }


# --- GPU check -------------------------------------------------------------------------------


def gpu_check_job(ns: str, pool: str, gpus: int, image: str, pool_label: str) -> dict[str, Any]:
    """Runs `nvidia-smi -L` once on a node of the pool: drivers, device plugin and taints work."""
    name = f"gpu-check-{pool}"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": ns, "labels": labels(name, "gpu-check")},
        "spec": {
            "backoffLimit": 2,
            "ttlSecondsAfterFinished": 3600,
            # A pool at zero nodes scales up for this pod, then back down once it finished.
            "activeDeadlineSeconds": 1800,
            "template": {
                "metadata": {"labels": labels(name, "gpu-check")},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": restricted_pod_security(),
                    "nodeSelector": {pool_label: pool},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [
                        {
                            "name": "nvidia-smi",
                            "image": image,
                            "command": ["nvidia-smi", "-L"],
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "128Mi", "nvidia.com/gpu": str(gpus)},
                                "limits": {"memory": "128Mi", "nvidia.com/gpu": str(gpus)},
                            },
                            "securityContext": restricted_container_security(),
                        }
                    ],
                },
            },
        },
    }


# --- Locust ----------------------------------------------------------------------------------

LOCUSTFILE = "/app/load/locustfiles/tokenfleet_llm.py"
LOCUST_MASTER_PORT = 5557
LOCUST_UI_PORT = 8089
BENCH_CONFIG = "/etc/tokenfleet/bench-config.json"


def locust_configmap(ns: str, bench_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "locust-config", "namespace": ns, "labels": labels("locust", "load")},
        "data": {"bench-config.json": json.dumps(bench_config, indent=2, sort_keys=True)},
    }


def _locust_pod(role: str, image: str, args: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": f"locust-{role}",
        "image": image,
        "command": ["python", "-m", "locust"],
        "args": ["-f", LOCUSTFILE, *args],
        "env": [
            {"name": "TOKENFLEET_BENCH_CONFIG", "value": BENCH_CONFIG},
            # Locust puts the locustfile's folder on sys.path; safe-path keeps /app out of it.
            {"name": "PYTHONSAFEPATH", "value": "1"},
        ],
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": restricted_container_security(),
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/tokenfleet", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        **extra,
    }
    return {
        "metadata": {"labels": {**labels("locust", "load"), "tokenfleet.dev/locust-role": role}},
        "spec": {
            "securityContext": restricted_pod_security(),
            "automountServiceAccountToken": False,
            "containers": [container],
            "volumes": [
                {"name": "config", "configMap": {"name": "locust-config"}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            ],
        },
    }


def _locust_deployment(ns: str, role: str, replicas: int, pod: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"locust-{role}", "namespace": ns, "labels": labels("locust", "load")},
        "spec": {
            "replicas": replicas,
            "selector": {
                "matchLabels": {"app.kubernetes.io/name": "locust", "tokenfleet.dev/locust-role": role}
            },
            "template": pod,
        },
    }


def locust_master(ns: str, image: str, target: str, workers: int, stop_timeout_s: float) -> dict[str, Any]:
    args = [
        "--master",
        "--master-bind-port",
        str(LOCUST_MASTER_PORT),
        "--web-host",
        "0.0.0.0",
        "--web-port",
        str(LOCUST_UI_PORT),
        "--host",
        target,
        "--expect-workers",
        str(workers),
        "--stop-timeout",
        f"{stop_timeout_s:g}",
    ]
    probe = {"httpGet": {"path": "/", "port": "web"}, "periodSeconds": 10, "timeoutSeconds": 5}
    extra = {
        "ports": [
            {"name": "master", "containerPort": LOCUST_MASTER_PORT, "protocol": "TCP"},
            {"name": "web", "containerPort": LOCUST_UI_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "failureThreshold": 6},
    }
    return _locust_deployment(ns, "master", 1, _locust_pod("master", image, args, extra))


def locust_workers(ns: str, image: str, workers: int) -> dict[str, Any]:
    args = ["--worker", "--master-host", "locust-master", "--master-port", str(LOCUST_MASTER_PORT)]
    # A worker serves no port; it exits (and restarts) when it loses the master's heartbeat, so
    # the probe only checks the process still answers: exec of the interpreter in the image.
    probe = {
        "exec": {"command": ["python", "-c", "import locust"]},
        "periodSeconds": 30,
        "timeoutSeconds": 10,
    }
    extra = {"livenessProbe": probe, "readinessProbe": probe}
    return _locust_deployment(ns, "worker", workers, _locust_pod("worker", image, args, extra))


def locust_service(ns: str) -> dict[str, Any]:
    """ClusterIP only: the UI is never exposed outside the cluster (port-forward it)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "locust-master", "namespace": ns, "labels": labels("locust", "load")},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": "locust", "tokenfleet.dev/locust-role": "master"},
            "ports": [
                {"name": "master", "port": LOCUST_MASTER_PORT, "targetPort": "master", "protocol": "TCP"},
                {"name": "web", "port": LOCUST_UI_PORT, "targetPort": "web", "protocol": "TCP"},
            ],
        },
    }
