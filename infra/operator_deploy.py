"""`Operator`: the LLMService CRD, the operator's least-privilege RBAC and its Deployment.

The CRD and RBAC come from the operator package itself (`crd_manifest()`, `rbac_manifests()`), so
what is deployed is what the operator's tests check. The operator watches only the namespaces the
stack's services live in: its namespaced permissions are Roles there, not a ClusterRole.
(Module name: not `operator`, which would shadow the standard library when Pulumi puts infra/ on
sys.path.)
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from tokenfleet.infra import manifests
from tokenfleet.infra.kube import apply
from tokenfleet.operator.crd import crd_manifest
from tokenfleet.operator.model import ENGINE_PORT
from tokenfleet.operator.rbac import SERVICE_ACCOUNT, rbac_manifests

HEALTH_PORT = 8080
METRICS_PORT = 9090


@dataclass(frozen=True, slots=True)
class OperatorArgs:
    provider: k8s.Provider
    namespace: str
    image: str
    watch_namespaces: list[str]
    env: dict[str, str]
    log_level: str
    monitoring_namespace: str
    monitoring_release: pulumi.Resource  # ServiceMonitor's CRD comes with kube-prometheus-stack
    namespaces: dict[str, pulumi.Resource]  # the watched namespaces, created by the program
    gateway_ports: list[int]  # the services' gateway ports (the operator reads their /metrics)


class Operator(pulumi.ComponentResource):
    crd: pulumi.CustomResource
    deployment: pulumi.CustomResource

    def __init__(self, name: str, args: OperatorArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tokenfleet:infra:Operator", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=args.provider)
        ns = args.namespace

        def after(*deps: pulumi.Resource) -> pulumi.ResourceOptions:
            return pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=list(deps)))

        self.crd = apply(crd_manifest(), child)
        rbac = [
            apply(obj, after(*args.namespaces.values()))
            for obj in rbac_manifests(ns, watch_namespaces=args.watch_namespaces)
        ]
        deployment = manifests.operator_deployment(
            ns=ns,
            image=args.image,
            service_account=SERVICE_ACCOUNT,
            watch_namespaces=args.watch_namespaces,
            env=args.env,
            health_port=HEALTH_PORT,
            metrics_port=METRICS_PORT,
            log_level=args.log_level,
        )
        self.deployment = apply(deployment, after(self.crd, *rbac))
        selector = deployment["spec"]["selector"]["matchLabels"]
        service = manifests.metrics_service(ns, "tokenfleet-operator-metrics", selector, METRICS_PORT)
        svc = apply(service, after(*args.namespaces.values()))
        apply(
            manifests.service_monitor(
                ns, "tokenfleet-operator", service["metadata"]["labels"], release="kube-prometheus-stack"
            ),
            after(svc, args.monitoring_release),
        )
        apply(
            manifests.operator_policy(
                ns,
                selector,
                METRICS_PORT,
                args.monitoring_namespace,
                args.watch_namespaces,
                [ENGINE_PORT, *args.gateway_ports],
            ),
            after(*args.namespaces.values()),
        )
        self.register_outputs({})
