"""`Monitoring`: kube-prometheus-stack, tokenfleet's dashboards and alert rules, OTel and Tempo.

The dashboards (observability/grafana.py) and rules (observability/rules/, promtool-tested) are
the repository's own; this component only ships them: one ConfigMap per dashboard for Grafana's
sidecar and one PrometheusRule. Prometheus selects every ServiceMonitor and rule in the cluster
(not only this release's), because the operator creates ServiceMonitors per LLMService.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import yaml

from tokenfleet.infra import charts, manifests
from tokenfleet.infra.kube import apply
from tokenfleet.infra.stackconfig import Monitoring as MonitoringConfig
from tokenfleet.observability import grafana, prometheusrule

RELEASE = "kube-prometheus-stack"  # also the `release` label its rule/monitor selectors use
GRAFANA_SERVICE = f"{RELEASE}-grafana"
PROMETHEUS_SERVICE = f"{RELEASE}-prometheus"
OTEL_RELEASE = "otel-collector"
TEMPO_RELEASE = "tempo"
GRAFANA_SECRET = "grafana-admin"
ALERTMANAGER_CONFIG = Path(prometheusrule.ROOT) / "alertmanager" / "alertmanager.yaml"


@dataclass(frozen=True, slots=True)
class MonitoringArgs:
    provider: k8s.Provider
    config: MonitoringConfig
    grafana_admin_password: pulumi.Output[str]


def _storage(size: str, storage_class: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"volumeClaimTemplate": {"spec": spec}}


def stack_values(cfg: MonitoringConfig, tempo_url: str) -> dict[str, Any]:
    """kube-prometheus-stack values: retention/storage from config, cluster-wide selectors."""
    return {
        "prometheus": {
            "prometheusSpec": {
                "retention": cfg.prometheus_retention,
                "storageSpec": _storage(cfg.prometheus_storage, cfg.storage_class),
                # Select every ServiceMonitor/PodMonitor/rule, not only those labelled with this release.
                "serviceMonitorSelectorNilUsesHelmValues": False,
                "podMonitorSelectorNilUsesHelmValues": False,
                "ruleSelectorNilUsesHelmValues": False,
                "enableFeatures": ["exemplar-storage"],
            }
        },
        "alertmanager": {"config": yaml.safe_load(ALERTMANAGER_CONFIG.read_text())},
        "grafana": {
            "admin": {
                "existingSecret": GRAFANA_SECRET,
                "userKey": "admin-user",
                "passwordKey": "admin-password",
            },
            "sidecar": {
                "dashboards": {
                    "enabled": True,
                    "label": manifests.DASHBOARD_LABEL,
                    "labelValue": "1",
                    "searchNamespace": "ALL",
                    "folderAnnotation": "grafana_folder",
                    "provider": {"foldersFromFilesStructure": True},
                }
            },
            "additionalDataSources": [
                {"name": "Tempo", "type": "tempo", "uid": "tempo", "url": tempo_url, "access": "proxy"}
            ],
        },
    }


def otel_values(tempo_otlp: str) -> dict[str, Any]:
    """A gateway-mode collector: OTLP in (gRPC 4317, HTTP 4318), batched, OTLP out to Tempo."""
    repository, tag = charts.OTEL_COLLECTOR_IMAGE
    return {
        "mode": "deployment",
        "image": {"repository": repository, "tag": tag},
        "config": {
            "receivers": {
                "otlp": {
                    "protocols": {
                        "grpc": {"endpoint": "0.0.0.0:4317"},
                        "http": {"endpoint": "0.0.0.0:4318"},
                    }
                }
            },
            "processors": {"batch": {}, "memory_limiter": {"check_interval": "1s", "limit_percentage": 80}},
            "exporters": {"otlp": {"endpoint": tempo_otlp, "tls": {"insecure": True}}},
            "service": {
                "pipelines": {
                    "traces": {
                        "receivers": ["otlp"],
                        "processors": ["memory_limiter", "batch"],
                        "exporters": ["otlp"],
                    }
                }
            },
        },
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
    }


def tempo_values(cfg: MonitoringConfig) -> dict[str, Any]:
    persistence: dict[str, Any] = {"enabled": True, "size": cfg.traces.storage}
    if cfg.storage_class:
        persistence["storageClassName"] = cfg.storage_class
    return {
        "tempo": {
            "retention": cfg.traces.retention,
            # Explicit endpoints: recent Tempo releases bind receivers to localhost by default,
            # which the collector in another pod could not reach.
            "receivers": {
                "otlp": {
                    "protocols": {
                        "grpc": {"endpoint": "0.0.0.0:4317"},
                        "http": {"endpoint": "0.0.0.0:4318"},
                    }
                }
            },
        },
        "persistence": persistence,
    }


def dashboards() -> dict[str, dict[str, Any]]:
    """name -> dashboard JSON, built by observability/grafana.py (the files are its output)."""
    return {name: build() for name, build in grafana.DASHBOARDS.items()}


class Monitoring(pulumi.ComponentResource):
    release: k8s.helm.v3.Release
    grafana_url: str
    otlp_endpoint: str

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tokenfleet:infra:Monitoring", name, None, opts)
        cfg = args.config
        ns = cfg.namespace
        child = pulumi.ResourceOptions(parent=self, provider=args.provider)
        # node-exporter needs hostNetwork/hostPID: this namespace cannot be `restricted`. It holds
        # only the charts below; tokenfleet's own workloads run in restricted namespaces.
        namespace = apply(manifests.namespace(ns, "privileged"), child)
        in_ns = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[namespace]))
        # Grafana reads its admin login from this Secret (never the chart's default password).
        admin = apply(
            manifests.opaque_secret(ns, GRAFANA_SECRET, "grafana", "admin-password"),
            in_ns,
            string_data={"admin-user": "admin", "admin-password": args.grafana_admin_password},
        )
        secret_deps: list[pulumi.Resource] = [admin]
        tempo_url = f"http://{TEMPO_RELEASE}.{ns}.svc:3100"
        self.otlp_endpoint = f"http://{OTEL_RELEASE}-opentelemetry-collector.{ns}.svc:4318"
        self.grafana_url = f"http://{GRAFANA_SERVICE}.{ns}.svc"
        self.release = self._release(
            name, charts.KUBE_PROMETHEUS_STACK, RELEASE, ns, stack_values(cfg, tempo_url), in_ns, secret_deps
        )
        tempo = self._release(f"{name}-tempo", charts.TEMPO, TEMPO_RELEASE, ns, tempo_values(cfg), in_ns, [])
        self._release(
            f"{name}-otel",
            charts.OTEL_COLLECTOR,
            OTEL_RELEASE,
            ns,
            otel_values(f"{TEMPO_RELEASE}.{ns}.svc:4317"),
            in_ns,
            [tempo],
        )
        # PrometheusRule and the dashboards need the chart's CRDs and Grafana: after the release.
        after = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[self.release]))
        rule = prometheusrule.prometheus_rule(prometheusrule.load_groups(), namespace=ns, release=RELEASE)
        apply(rule, after)
        for dashboard_name, dashboard in dashboards().items():
            apply(manifests.dashboard_configmap(ns, dashboard_name, dashboard), in_ns)
        self.register_outputs({"grafanaUrl": self.grafana_url, "otlpEndpoint": self.otlp_endpoint})

    def _release(
        self,
        name: str,
        chart: charts.Chart,
        release: str,
        ns: str,
        values: dict[str, Any],
        opts: pulumi.ResourceOptions,
        depends_on: list[pulumi.Resource],
    ) -> k8s.helm.v3.Release:
        return k8s.helm.v3.Release(
            name,
            name=release,
            chart=chart.name,
            version=chart.version,
            repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=chart.repo),
            namespace=ns,
            values=values,
            atomic=True,
            timeout=900,
            opts=pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(depends_on=depends_on)),
        )
