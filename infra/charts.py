"""Every Helm chart the program installs, pinned: bump a version here, deliberately, in one place.

Versions were chosen in 2026-11 (see docs/adr/0008-infra.md); Pulumi fetches exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Chart:
    name: str
    version: str
    repo: str


NVIDIA_DEVICE_PLUGIN = Chart("nvidia-device-plugin", "0.17.1", "https://nvidia.github.io/k8s-device-plugin")
KUBE_PROMETHEUS_STACK = Chart(
    "kube-prometheus-stack", "69.4.1", "https://prometheus-community.github.io/helm-charts"
)
OTEL_COLLECTOR = Chart(
    "opentelemetry-collector", "0.140.0", "https://open-telemetry.github.io/opentelemetry-helm-charts"
)
TEMPO = Chart("tempo", "1.24.4", "https://grafana.github.io/helm-charts")

# Images the charts run that the charts do not pin themselves.
OTEL_COLLECTOR_IMAGE = ("otel/opentelemetry-collector-contrib", "0.140.0")

ALL = (NVIDIA_DEVICE_PLUGIN, KUBE_PROMETHEUS_STACK, OTEL_COLLECTOR, TEMPO)
