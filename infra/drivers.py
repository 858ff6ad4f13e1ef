"""`GpuDrivers`: what makes `nvidia.com/gpu` schedulable, and a check that it is.

EKS: the accelerated AMI has the driver; the NVIDIA device plugin (pinned Helm release) advertises
the GPUs. GKE: the node pool installs the driver and GKE runs its own device plugin, so a second
plugin would double-advertise — no release there. Existing clusters say which case they are.
Each GPU pool gets a one-shot `nvidia-smi -L` Job that requests the pool's GPUs: it completes
only if drivers, device plugin, labels and taints all line up.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from tokenfleet.infra import charts, manifests
from tokenfleet.infra.cluster import GPU_TAINT_KEY, POOL_LABEL
from tokenfleet.infra.kube import apply
from tokenfleet.infra.stackconfig import GpuPool

PLUGIN_NAMESPACE = "nvidia-device-plugin"


@dataclass(frozen=True, slots=True)
class GpuDriversArgs:
    provider: k8s.Provider
    install_device_plugin: bool
    pools: list[GpuPool]
    check_namespace: str
    check_image: str


class GpuDrivers(pulumi.ComponentResource):
    release: k8s.helm.v3.Release | None
    checks: list[pulumi.CustomResource]

    def __init__(self, name: str, args: GpuDriversArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tokenfleet:infra:GpuDrivers", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=args.provider)
        self.release = None
        if args.install_device_plugin:
            # The plugin DaemonSet mounts host paths: its namespace is `privileged`, and it is the
            # only thing there.
            ns = apply(manifests.namespace(PLUGIN_NAMESPACE, "privileged"), child)
            chart = charts.NVIDIA_DEVICE_PLUGIN
            self.release = k8s.helm.v3.Release(
                f"{name}-device-plugin",
                name="nvidia-device-plugin",
                chart=chart.name,
                version=chart.version,
                repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=chart.repo),
                namespace=PLUGIN_NAMESPACE,
                atomic=True,
                values={
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "tolerations": [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
                },
                opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[ns])),
            )
        after = [self.release] if self.release is not None else []
        self.checks = [
            apply(
                manifests.gpu_check_job(
                    args.check_namespace, pool.name, pool.gpus_per_node, args.check_image, POOL_LABEL
                ),
                # A pool at zero nodes first scales up (GPU nodes take minutes): wait long enough.
                pulumi.ResourceOptions.merge(
                    child,
                    pulumi.ResourceOptions(
                        depends_on=after, custom_timeouts=pulumi.CustomTimeouts(create="30m")
                    ),
                ),
            )
            for pool in args.pools
        ]
        self.register_outputs({})
