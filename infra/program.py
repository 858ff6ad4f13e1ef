"""The Pulumi program: `program(config, secrets)` builds the whole stack from typed config.

A function, not module-level code, so the unit tests run it once per stack under Pulumi's mocks;
`infra/__main__.py` calls it with `load_stack_config()`. Order of the graph:

    GpuCluster ─┬─ namespaces (PSS restricted) + baseline NetworkPolicies
                ├─ GpuDrivers (device plugin, nvidia-smi check per pool)
                ├─ Monitoring (kube-prometheus-stack, dashboards, rules, OTel, Tempo)
                ├─ Operator (CRD, RBAC, Deployment, metrics Service, ServiceMonitor)
                ├─ LLMServices (the CRs and their Secrets)
                └─ LoadGenerators (Locust)
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from tokenfleet.infra import manifests
from tokenfleet.infra.cluster import GpuCluster, GpuClusterArgs
from tokenfleet.infra.drivers import GpuDrivers, GpuDriversArgs
from tokenfleet.infra.kube import apply
from tokenfleet.infra.loadgen import LoadGenerators, LoadGeneratorsArgs
from tokenfleet.infra.monitoring import GRAFANA_SERVICE, Monitoring, MonitoringArgs
from tokenfleet.infra.operator_deploy import Operator, OperatorArgs
from tokenfleet.infra.services import LLMServices, LLMServicesArgs, complete_service
from tokenfleet.infra.stackconfig import (
    EksCluster,
    ExistingCluster,
    SecretRef,
    StackConfig,
    StackConfigError,
    StackSecrets,
)
from tokenfleet.spec import LLMService


@dataclass(frozen=True, slots=True)
class Stack:
    """What `program()` built (the tests inspect it; Pulumi only needs the exports)."""

    cluster: GpuCluster
    drivers: GpuDrivers | None
    monitoring: Monitoring
    operator: Operator
    services: LLMServices
    load: LoadGenerators | None
    completed: list[LLMService]


def check_secrets(config: StackConfig, secrets: StackSecrets) -> pulumi.Output[str]:
    """Secrets the stack needs but cannot validate as plain config (they are Outputs).

    Returns Grafana's admin password, the one secret every stack needs."""
    errors = []
    if secrets.grafana_admin_password is None:
        errors.append(
            (
                "tokenfleet:grafanaAdminPassword",
                "required secret missing: pulumi config set --secret tokenfleet:grafanaAdminPassword <pw>",
            )
        )
    if config.hf_token_secret is not None and secrets.hf_token is None:
        errors.append(
            (
                "tokenfleet:hfToken",
                f"hfTokenSecret names {config.hf_token_secret.name!r} but no token is set: "
                "pulumi config set --secret tokenfleet:hfToken <token>",
            )
        )
    if errors or secrets.grafana_admin_password is None:
        raise StackConfigError(errors)
    return secrets.grafana_admin_password


def create_namespaces(config: StackConfig, base: pulumi.ResourceOptions) -> dict[str, pulumi.Resource]:
    """Every tokenfleet namespace: Pod Security `restricted`, default-deny, DNS and OTLP egress.
    Components add the narrow allows their own pods need."""
    namespaces: dict[str, pulumi.Resource] = {}
    for ns in config.tokenfleet_namespaces():
        namespaces[ns] = apply(manifests.namespace(ns), base)
        in_ns = pulumi.ResourceOptions.merge(base, pulumi.ResourceOptions(depends_on=[namespaces[ns]]))
        for policy in (
            manifests.default_deny(ns),
            manifests.allow_dns(ns),
            manifests.allow_otlp_egress(ns, config.monitoring.namespace),
        ):
            apply(policy, in_ns)
    return namespaces


def needs_device_plugin(config: StackConfig) -> bool:
    """EKS's AMI has the driver but no plugin; GKE runs its own; an existing cluster says."""
    cluster = config.cluster
    if isinstance(cluster, EksCluster):
        return True
    return isinstance(cluster, ExistingCluster) and cluster.gpu_drivers == "device-plugin"


def operator_env(config: StackConfig, monitoring: Monitoring, hf_ref: SecretRef | None) -> dict[str, str]:
    """Cluster-wide conventions the operator applies to every service it runs."""
    env = {
        "TOKENFLEET_GATEWAY_IMAGE": config.images.gateway,
        "TOKENFLEET_PROMETHEUS_NAMESPACE": config.monitoring.namespace,
        "OTEL_EXPORTER_OTLP_ENDPOINT": monitoring.otlp_endpoint,
    }
    if hf_ref is not None:
        env["TOKENFLEET_HF_TOKEN_SECRET"] = f"{hf_ref.name}/{hf_ref.key}"
    return env


def program(config: StackConfig, secrets: StackSecrets, stack: str | None = None) -> Stack:
    grafana_password = check_secrets(config, secrets)
    stack = stack or pulumi.get_stack()
    cluster = GpuCluster("tokenfleet", GpuClusterArgs(cluster=config.cluster, stack=stack))
    provider = cluster.provider
    namespaces = create_namespaces(config, pulumi.ResourceOptions(provider=provider))

    pools = config.cluster.gpu_pools
    drivers = None
    if pools:
        drivers = GpuDrivers(
            "gpu-drivers",
            GpuDriversArgs(
                provider=provider,
                install_device_plugin=needs_device_plugin(config),
                pools=pools,
                check_namespace=config.operator.namespace,
                check_image=config.images.gpu_check,
            ),
            pulumi.ResourceOptions(depends_on=[namespaces[config.operator.namespace], cluster]),
        )

    monitoring = Monitoring(
        "monitoring",
        MonitoringArgs(provider=provider, config=config.monitoring, grafana_admin_password=grafana_password),
        pulumi.ResourceOptions(depends_on=[cluster]),
    )

    completed = [complete_service(s, config.namespace_of(s), config.images, pools) for s in config.services]
    hf_ref = config.hf_token_secret or (SecretRef(name="hf-token") if secrets.hf_token is not None else None)
    operator = Operator(
        "operator",
        OperatorArgs(
            provider=provider,
            namespace=config.operator.namespace,
            image=config.images.operator,
            watch_namespaces=config.service_namespaces(),
            env=operator_env(config, monitoring, hf_ref),
            log_level=config.operator.log_level,
            monitoring_namespace=config.monitoring.namespace,
            monitoring_release=monitoring.release,
            namespaces=namespaces,
            gateway_ports=[s.spec.gateway.port for s in completed],
        ),
    )
    services = LLMServices(
        "services",
        LLMServicesArgs(
            provider=provider,
            services=completed,
            service_namespaces=config.service_namespaces(),
            crd=operator.crd,
            operator=operator.deployment,
            namespaces=namespaces,
            api_keys=secrets.api_keys,
            hf_token=secrets.hf_token,
            hf_token_secret=hf_ref,
        ),
    )

    load = None
    load_cfg = config.load_generators
    if load_cfg.enabled:
        target = next(s for s in completed if s.metadata.name == load_cfg.target)
        key = f"{target.metadata.namespace}/{target.metadata.name}"
        load = LoadGenerators(
            "load",
            LoadGeneratorsArgs(
                provider=provider,
                config=load_cfg,
                image=config.images.load,
                service=target,
                target=services.endpoints[key],
                namespace=namespaces[load_cfg.namespace],
            ),
            pulumi.ResourceOptions(depends_on=[services]),
        )

    export(config, cluster, monitoring, services, load)
    return Stack(cluster, drivers, monitoring, operator, services, load, completed)


def export(
    config: StackConfig,
    cluster: GpuCluster,
    monitoring: Monitoring,
    services: LLMServices,
    load: LoadGenerators | None,
) -> None:
    mon_ns = config.monitoring.namespace
    endpoints = services.endpoints
    first = next(iter(endpoints), None)
    pulumi.export("gatewayEndpoints", endpoints)
    pulumi.export("gatewayEndpoint", endpoints[first] if first else "")
    if first:
        ns, name = first.split("/")
        port = next(s.spec.gateway.port for s in config.services if s.metadata.name == name)
        pulumi.export("gatewayPortForward", f"kubectl -n {ns} port-forward svc/{name} {port}:{port}")
    pulumi.export("grafanaUrl", monitoring.grafana_url)
    pulumi.export("grafanaPortForward", f"kubectl -n {mon_ns} port-forward svc/{GRAFANA_SERVICE} 3000:80")
    if load is not None:
        pulumi.export("locustUi", load.ui_url)
        pulumi.export(
            "locustPortForward",
            f"kubectl -n {config.load_generators.namespace} port-forward svc/locust-master 8089:8089",
        )
    pulumi.export("kubeconfig", cluster.kubeconfig)
    pulumi.export(
        "gpuPools",
        {
            p.name: {
                "instanceType": p.instance_type,
                "gpu": p.gpu,
                "maxNodes": p.max_nodes,
                "hourlyUsd": p.hourly_usd,
            }
            for p in config.cluster.gpu_pools
        },
    )
