"""`GpuCluster`: the cluster and its node pools (EKS, GKE) or an adopted one, plus its provider.

Every GPU pool carries the same scheduling contract whatever the cloud, so the operator places
engine pods the same way everywhere: label `tokenfleet.dev/gpu-pool=<pool>` (plus
`tokenfleet.dev/gpu=<model>`) and taint `nvidia.com/gpu=present:NoSchedule`, which only pods that
tolerate GPUs pass. The CPU system pool is untainted and holds everything else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from tokenfleet.infra.stackconfig import EksCluster, ExistingCluster, GkeCluster, GpuPool

POOL_LABEL = "tokenfleet.dev/gpu-pool"
GPU_LABEL = "tokenfleet.dev/gpu"
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_TAINT_VALUE = "present"
SYSTEM_POOL = "system"


def pool_labels(pool: GpuPool) -> dict[str, str]:
    # nvidia.com/gpu.present: the NVIDIA device plugin chart's node affinity selects on it.
    return {POOL_LABEL: pool.name, GPU_LABEL: pool.gpu, "nvidia.com/gpu.present": "true"}


@dataclass(frozen=True, slots=True)
class GpuClusterArgs:
    cluster: ExistingCluster | EksCluster | GkeCluster
    stack: str


class GpuCluster(pulumi.ComponentResource):
    """The cluster's node pools and a Kubernetes provider every other component deploys with."""

    provider: k8s.Provider
    kubeconfig: pulumi.Output[str]
    node_pools: dict[str, pulumi.Resource]

    def __init__(self, name: str, args: GpuClusterArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tokenfleet:infra:GpuCluster", name, None, opts)
        self.node_pools = {}
        cluster = args.cluster
        if isinstance(cluster, EksCluster):
            kubeconfig = self._eks(name, cluster, args.stack)
        elif isinstance(cluster, GkeCluster):
            kubeconfig = self._gke(name, cluster, args.stack)
        else:
            kubeconfig = _existing_kubeconfig(cluster)
        self.kubeconfig = pulumi.Output.secret(kubeconfig)
        provider_args: dict[str, Any] = {"enable_server_side_apply": True}
        if isinstance(cluster, ExistingCluster):
            if cluster.kubeconfig:
                provider_args["kubeconfig"] = os.path.expanduser(cluster.kubeconfig)
            if cluster.context:
                provider_args["context"] = cluster.context
        else:
            provider_args["kubeconfig"] = self.kubeconfig
        self.provider = k8s.Provider(f"{name}-k8s", opts=pulumi.ResourceOptions(parent=self), **provider_args)
        self.register_outputs({"kubeconfig": self.kubeconfig})

    def _eks(self, name: str, cfg: EksCluster, stack: str) -> pulumi.Output[str]:
        import pulumi_aws as aws
        import pulumi_eks as eks

        child = pulumi.ResourceOptions(parent=self)
        cluster_args: dict[str, Any] = {
            "version": cfg.kubernetes_version,
            # Node groups are declared below, one per pool: no unmanaged default group.
            "skip_default_node_group": True,
            "authentication_mode": "API",
            "endpoint_public_access": True,
            "public_access_cidrs": cfg.public_access_cidrs,
            "create_oidc_provider": True,
        }
        subnet_ids: pulumi.Input[list[str]]
        if cfg.vpc_id:
            cluster_args.update(vpc_id=cfg.vpc_id, private_subnet_ids=cfg.subnet_ids)
            subnet_ids = cfg.subnet_ids
        else:
            # No network configured: the account's default VPC and its default subnets, as
            # pulumi-eks would pick, looked up here so the node groups name them explicitly.
            vpc = aws.ec2.get_vpc_output(default=True)
            subnet_ids = aws.ec2.get_subnets_output(
                filters=[
                    aws.ec2.GetSubnetsFilterArgs(name="vpc-id", values=[vpc.id]),
                    aws.ec2.GetSubnetsFilterArgs(name="default-for-az", values=["true"]),
                ]
            ).ids
            cluster_args.update(vpc_id=vpc.id, subnet_ids=subnet_ids)
        # A fixed cluster name: the node groups name it, and the console shows it.
        cluster_name = f"{name}-{stack}"
        cluster = eks.Cluster(name, name=cluster_name, opts=child, **cluster_args)
        role = aws.iam.Role(
            f"{name}-nodes",
            assume_role_policy=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "ec2.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            ),
            opts=child,
        )
        policies = []
        for i, policy in enumerate(
            (
                "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
                "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
                "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
            )
        ):
            policies.append(
                aws.iam.RolePolicyAttachment(
                    f"{name}-nodes-{i}", role=role.name, policy_arn=policy, opts=child
                )
            )
        # Managed node groups (aws.eks.NodeGroup: what pulumi-eks's ManagedNodeGroup wraps) named by
        # cluster name and role ARN, so their inputs hold no resource references.
        group_opts = pulumi.ResourceOptions(parent=self, depends_on=[cluster, *policies])
        system = cfg.system_pool
        self.node_pools[SYSTEM_POOL] = aws.eks.NodeGroup(
            f"{name}-{SYSTEM_POOL}",
            cluster_name=cluster_name,
            node_role_arn=role.arn,
            subnet_ids=subnet_ids,
            instance_types=[system.instance_type],
            ami_type="AL2023_x86_64_STANDARD",
            disk_size=system.disk_gib,
            labels={"tokenfleet.dev/pool": SYSTEM_POOL},
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                min_size=system.min_nodes, max_size=system.max_nodes, desired_size=system.min_nodes
            ),
            opts=group_opts,
        )
        for pool in cfg.gpu_pools:
            self.node_pools[pool.name] = aws.eks.NodeGroup(
                f"{name}-{pool.name}",
                cluster_name=cluster_name,
                node_role_arn=role.arn,
                subnet_ids=subnet_ids,
                instance_types=[pool.instance_type],
                # EKS's accelerated AMI ships the NVIDIA driver and container toolkit.
                ami_type="AL2023_x86_64_NVIDIA",
                capacity_type="SPOT" if pool.spot else "ON_DEMAND",
                disk_size=pool.disk_gib,
                labels=pool_labels(pool),
                taints=[
                    aws.eks.NodeGroupTaintArgs(key=GPU_TAINT_KEY, value=GPU_TAINT_VALUE, effect="NO_SCHEDULE")
                ],
                scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                    min_size=pool.min_nodes, max_size=pool.max_nodes, desired_size=pool.min_nodes
                ),
                # The autoscaler scales from zero only if it knows the pool's labels and taints.
                tags={
                    f"k8s.io/cluster-autoscaler/node-template/label/{POOL_LABEL}": pool.name,
                    f"k8s.io/cluster-autoscaler/node-template/taint/{GPU_TAINT_KEY}": (
                        f"{GPU_TAINT_VALUE}:NoSchedule"
                    ),
                },
                opts=group_opts,
            )
        kubeconfig: pulumi.Output[str] = cluster.kubeconfig_json
        return kubeconfig

    def _gke(self, name: str, cfg: GkeCluster, stack: str) -> pulumi.Output[str]:
        import pulumi_gcp as gcp

        child = pulumi.ResourceOptions(parent=self)
        cluster = gcp.container.Cluster(
            name,
            project=cfg.project,
            location=cfg.location,
            node_locations=cfg.node_locations or None,
            # Pools are separate resources: drop the default pool GKE insists on creating.
            remove_default_node_pool=True,
            initial_node_count=1,
            release_channel=gcp.container.ClusterReleaseChannelArgs(channel=cfg.release_channel),
            workload_identity_config=gcp.container.ClusterWorkloadIdentityConfigArgs(
                workload_pool=f"{cfg.project}.svc.id.goog"
            ),
            # Dataplane V2 enforces NetworkPolicies (the default GKE dataplane does not).
            datapath_provider="ADVANCED_DATAPATH",
            deletion_protection=stack.startswith("prod"),
            opts=child,
        )
        system = cfg.system_pool
        self.node_pools[SYSTEM_POOL] = gcp.container.NodePool(
            f"{name}-{SYSTEM_POOL}",
            project=cfg.project,
            location=cfg.location,
            cluster=cluster.name,
            initial_node_count=system.min_nodes,
            autoscaling=gcp.container.NodePoolAutoscalingArgs(
                min_node_count=system.min_nodes, max_node_count=system.max_nodes
            ),
            node_config=gcp.container.NodePoolNodeConfigArgs(
                machine_type=system.instance_type,
                disk_size_gb=system.disk_gib,
                labels={"tokenfleet.dev/pool": SYSTEM_POOL},
                oauth_scopes=["https://www.googleapis.com/auth/cloud-platform"],
                workload_metadata_config=gcp.container.NodePoolNodeConfigWorkloadMetadataConfigArgs(
                    mode="GKE_METADATA"
                ),
            ),
            opts=child,
        )
        for pool in cfg.gpu_pools:
            self.node_pools[pool.name] = gcp.container.NodePool(
                f"{name}-{pool.name}",
                project=cfg.project,
                location=cfg.location,
                cluster=cluster.name,
                initial_node_count=pool.min_nodes,
                autoscaling=gcp.container.NodePoolAutoscalingArgs(
                    min_node_count=pool.min_nodes, max_node_count=pool.max_nodes
                ),
                node_config=gcp.container.NodePoolNodeConfigArgs(
                    machine_type=pool.instance_type,
                    disk_size_gb=pool.disk_gib,
                    spot=pool.spot,
                    labels=pool_labels(pool),
                    taints=[
                        gcp.container.NodePoolNodeConfigTaintArgs(
                            key=GPU_TAINT_KEY, value=GPU_TAINT_VALUE, effect="NO_SCHEDULE"
                        )
                    ],
                    guest_accelerators=[
                        gcp.container.NodePoolNodeConfigGuestAcceleratorArgs(
                            type=pool.gpu,
                            count=pool.gpus_per_node,
                            # GKE installs the driver and runs its own device plugin: no Helm release.
                            gpu_driver_installation_config=gcp.container.NodePoolNodeConfigGuestAcceleratorGpuDriverInstallationConfigArgs(
                                gpu_driver_version="DEFAULT"
                            ),
                        )
                    ],
                    oauth_scopes=["https://www.googleapis.com/auth/cloud-platform"],
                    workload_metadata_config=gcp.container.NodePoolNodeConfigWorkloadMetadataConfigArgs(
                        mode="GKE_METADATA"
                    ),
                ),
                opts=child,
            )
        return pulumi.Output.all(
            cluster.name, cluster.endpoint, cluster.master_auth.cluster_ca_certificate
        ).apply(lambda parts: gke_kubeconfig(parts[0], parts[1], parts[2]))


def gke_kubeconfig(cluster: str, endpoint: str, ca_certificate: str) -> str:
    """A kubeconfig that authenticates with gcloud's plugin (no long-lived credential in it)."""
    context = f"gke-{cluster}"
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": context,
                    "cluster": {
                        "server": f"https://{endpoint}",
                        "certificate-authority-data": ca_certificate,
                    },
                }
            ],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
            "current-context": context,
            "users": [
                {
                    "name": context,
                    "user": {
                        "exec": {
                            "apiVersion": "client.authentication.k8s.io/v1beta1",
                            "command": "gke-gcloud-auth-plugin",
                            "provideClusterInfo": True,
                            "installHint": "gcloud components install gke-gcloud-auth-plugin",
                        }
                    },
                }
            ],
        }
    )


def _existing_kubeconfig(cfg: ExistingCluster) -> pulumi.Output[str]:
    """The adopted cluster's kubeconfig text, for the `kubeconfig` output (as a secret)."""
    # $KUBECONFIG may list several files; kubectl reads the first for the current context.
    default = os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]
    path = Path(os.path.expanduser(cfg.kubeconfig or default))
    text = path.read_text() if path.is_file() else ""
    return pulumi.Output.from_input(text)
