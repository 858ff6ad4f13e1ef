"""The typed stack config: every `tokenfleet:*` key of a `Pulumi.<stack>.yaml`, validated on load.

The Pulumi program never reads `pulumi.Config` itself: `load_stack_config()` reads it once, here,
and the components take the typed `StackConfig`. A bad key fails before any resource is
registered, with the key's full path (`tokenfleet:cluster.gpuPools[0].maxNodes`) and what it
expects. Secrets (Grafana's admin password, API keys, the Hugging Face token) are not part of the
model: they stay Pulumi secret Outputs (`StackSecrets`) so they are never in plain text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import pulumi
from pulumi.runtime import config as runtime_config
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from tokenfleet.spec import LLMService, SpecError, parse_service

PROJECT = "tokenfleet"
PROVIDERS = ("existing", "eks", "gke")
# Keys read as Pulumi secrets (Outputs), never into the model.
SECRET_KEYS = frozenset({"grafanaAdminPassword", "hfToken", "apiKeys"})
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Kubernetes resource quantity (storage sizes) and Prometheus/Tempo durations.
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"
DURATION = r"^[0-9]+(ms|s|m|h|d|w|y)$"
# Namespaces tokenfleet must not claim: it labels the namespaces it creates with Pod Security
# `restricted`, and it cannot (and must not) relabel these.
# load/workloads/ of this checkout (infra/ and load/ are siblings; the symlink is resolved).
WORKLOADS_DIR = Path(__file__).resolve().parent.parent / "load" / "workloads"
RESERVED_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

Name = Annotated[str, Field(min_length=1, max_length=40, pattern=DNS_LABEL)]
Namespace = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]


def check_pinned_image(image: str) -> str:
    """An image reference with an explicit tag or digest, and never `:latest`."""
    last = image.rsplit("/", 1)[-1]
    if "@sha256:" in image:
        return image
    if ":" not in last:
        raise ValueError(f"{image!r} has no tag: pin it to a version tag or @sha256 digest")
    if last.endswith(":latest"):
        raise ValueError(f"{image!r} uses :latest: pin it to a version tag or @sha256 digest")
    return image


PinnedImage = Annotated[str, Field(min_length=3, description="registry/repo:tag or repo@sha256:digest")]


class _Config(BaseModel):
    """camelCase keys as in YAML; unknown keys rejected (a typo must not pass silently)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, validate_default=True
    )


class SystemPool(_Config):
    """The CPU pool for the operator, gateways, monitoring and Locust."""

    instance_type: str = Field(description="EC2 instance type (eks) or GCE machine type (gke)")
    min_nodes: int = Field(2, ge=1, le=100, description="at least 1 node")
    max_nodes: int = Field(4, ge=1, le=100)
    disk_gib: int = Field(100, ge=20, le=4096)

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"minNodes ({self.min_nodes}) must not exceed maxNodes ({self.max_nodes})")
        return self


class GpuPool(_Config):
    """One node pool per GPU type: tainted so only pods that tolerate GPUs land there."""

    name: Name = Field(description="pool name, a DNS label (also the tokenfleet.dev/gpu-pool label)")
    instance_type: str = Field(description="EC2 instance type (eks, e.g. g6.xlarge) or machine type (gke)")
    gpu: str = Field(
        pattern=r"^nvidia-[a-z0-9-]+$",
        description="GPU model as nvidia-<model>, e.g. nvidia-l4; on gke the accelerator type",
    )
    gpus_per_node: int = Field(ge=1, le=16, description="GPUs on one node of instanceType")
    min_nodes: int = Field(0, ge=0, le=100, description="0 lets the pool scale to zero")
    max_nodes: int = Field(ge=1, le=100, description="upper bound for the cluster autoscaler")
    spot: bool = Field(False, description="spot/preemptible capacity (cheaper, can be reclaimed)")
    disk_gib: int = Field(200, ge=50, le=16384, description="node disk: images + model weights")
    hourly_usd: float | None = Field(None, gt=0, description="list price per node-hour, for the docs/outputs")

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"minNodes ({self.min_nodes}) must not exceed maxNodes ({self.max_nodes})")
        return self


def _unique_pools(cls: type[BaseModel], pools: list[GpuPool]) -> list[GpuPool]:
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ValueError(f"gpuPools names must be unique, got {names}")
    return pools


class ExistingCluster(_Config):
    """Adopt a running cluster (kind, k3d, minikube or any cloud cluster) through a kubeconfig."""

    provider: Literal["existing"]
    kubeconfig: str | None = Field(None, description="path to a kubeconfig; default: $KUBECONFIG/~/.kube")
    context: str | None = Field(None, description="kubeconfig context; default: the current one")
    gpu_drivers: Literal["none", "device-plugin", "preinstalled"] = Field(
        "none",
        description="none: CPU only; device-plugin: install NVIDIA's; preinstalled: the cluster has one",
    )
    gpu_pools: list[GpuPool] = Field(
        default_factory=list, description="GPU nodes already in the cluster, described for scheduling checks"
    )
    _unique = field_validator("gpu_pools")(_unique_pools)

    @model_validator(mode="after")
    def _gpus_need_drivers(self) -> Self:
        if self.gpu_pools and self.gpu_drivers == "none":
            raise ValueError("gpuPools are listed but gpuDrivers is none: use device-plugin or preinstalled")
        return self


class EksCluster(_Config):
    """A new EKS cluster (pulumi-eks) with managed node groups."""

    provider: Literal["eks"]
    region: str = Field(pattern=r"^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", description="AWS region, e.g. us-west-2")
    kubernetes_version: str = Field("1.33", pattern=r"^1\.[0-9]{2}$", description="e.g. 1.33")
    vpc_id: str | None = Field(None, pattern=r"^vpc-[0-9a-f]+$", description="default: the default VPC")
    subnet_ids: list[str] = Field(default_factory=list, description="private subnets for the nodes")
    public_access_cidrs: list[str] = Field(
        default_factory=lambda: ["0.0.0.0/0"], min_length=1, description="who may reach the API server"
    )
    system_pool: SystemPool = Field(default_factory=lambda: SystemPool(instance_type="m6i.xlarge"))
    gpu_pools: list[GpuPool] = Field(min_length=1, description="one managed node group per GPU type")
    _unique = field_validator("gpu_pools")(_unique_pools)

    @model_validator(mode="after")
    def _network(self) -> Self:
        if bool(self.vpc_id) != bool(self.subnet_ids):
            raise ValueError("vpcId and subnetIds go together: set both or neither (default VPC)")
        return self


class GkeCluster(_Config):
    """A new GKE Standard cluster with GPU node pools (GKE installs the drivers)."""

    provider: Literal["gke"]
    project: str = Field(pattern=r"^[a-z][-a-z0-9]{4,28}[a-z0-9]$", description="GCP project id")
    location: str = Field(
        pattern=r"^[a-z]+-[a-z]+[0-9](-[a-z])?$", description="region (us-central1) or zone (us-central1-a)"
    )
    node_locations: list[str] = Field(
        default_factory=list, description="zones for the nodes; GPUs are zonal, pick zones that have them"
    )
    release_channel: Literal["RAPID", "REGULAR", "STABLE"] = "REGULAR"
    system_pool: SystemPool = Field(default_factory=lambda: SystemPool(instance_type="e2-standard-4"))
    gpu_pools: list[GpuPool] = Field(min_length=1, description="one node pool per GPU type")
    _unique = field_validator("gpu_pools")(_unique_pools)


Cluster = Annotated[ExistingCluster | EksCluster | GkeCluster, Field(discriminator="provider")]


class Images(_Config):
    """Images tokenfleet runs, pinned (tag or digest): CI publishes them, config names them."""

    engine_gpu: PinnedImage = Field(description="engine on GPU nodes (images/engine-gpu.Dockerfile)")
    engine_cpu: PinnedImage = Field(description="engine on CPU nodes (images/engine-cpu.Dockerfile)")
    operator: PinnedImage = Field(description="the operator (images/operator.Dockerfile)")
    gateway: PinnedImage = Field(description="the gateway (images/gateway.Dockerfile)")
    load: PinnedImage = Field(description="Locust master/workers (images/load.Dockerfile)")
    gpu_check: PinnedImage = Field(
        "nvcr.io/nvidia/cuda:12.8.1-base-ubuntu24.04", description="runs nvidia-smi once per GPU pool"
    )

    @field_validator("engine_gpu", "engine_cpu", "operator", "gateway", "load", "gpu_check")
    @classmethod
    def _pinned(cls, image: str) -> str:
        return check_pinned_image(image)


class Traces(_Config):
    backend: Literal["tempo"] = Field("tempo", description="trace store (Tempo, single binary)")
    retention: str = Field("72h", pattern=DURATION, description="e.g. 72h")
    storage: str = Field("10Gi", pattern=QUANTITY, description="volume size, e.g. 10Gi")


class Monitoring(_Config):
    """kube-prometheus-stack, the OpenTelemetry collector and Tempo."""

    namespace: Namespace = "monitoring"
    prometheus_retention: str = Field("15d", pattern=DURATION, description="e.g. 15d")
    prometheus_storage: str = Field("50Gi", pattern=QUANTITY, description="volume size, e.g. 50Gi")
    storage_class: str | None = Field(
        None, description="StorageClass for the volumes; default: the cluster's"
    )
    traces: Traces = Field(default_factory=Traces)


class OperatorConfig(_Config):
    namespace: Namespace = "tokenfleet-system"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class LoadGenerators(_Config):
    """Locust against one service's gateway; the web UI stays inside the cluster."""

    enabled: bool = False
    namespace: Namespace = "tokenfleet-load"
    target: Name | None = Field(None, description="metadata.name of the LLMService to load")
    workload: str = Field(
        "default", pattern=r"^[a-z0-9-]+$", description="a workload in load/workloads/ (default, burst, ...)"
    )
    workers: int = Field(2, ge=1, le=64, description="Locust worker pods")
    duration_s: float = Field(600, gt=0, le=7 * 86400, description="how long one run lasts")

    @field_validator("workload")
    @classmethod
    def _known_workload(cls, workload: str) -> str:
        known = sorted(p.stem for p in WORKLOADS_DIR.glob("*.yaml"))
        if workload not in known:
            raise ValueError(f"unknown workload {workload!r}; load/workloads/ has {', '.join(known)}")
        return workload


class SecretRef(_Config):
    name: Name
    key: str = Field("token", pattern=r"^[-._a-zA-Z0-9]+$")


class StackConfig(_Config):
    """Everything a stack configures. `services` are LLMService documents (tokenfleet.spec)."""

    cluster: Cluster = Field(description="provider existing, eks or gke, and its node pools")
    images: Images = Field(description="engineGpu, engineCpu, operator, gateway and load images, pinned")
    monitoring: Monitoring = Field(default_factory=Monitoring)
    operator: OperatorConfig = Field(default_factory=OperatorConfig)
    services_namespace: Namespace = Field(
        "tokenfleet", description="namespace for services whose metadata names none"
    )
    services: list[LLMService] = Field(default_factory=list)
    load_generators: LoadGenerators = Field(default_factory=LoadGenerators)
    hf_token_secret: SecretRef | None = Field(
        None, description="Secret with the Hugging Face token (created from tokenfleet:hfToken if set)"
    )

    @field_validator("services", mode="before")
    @classmethod
    def _parse_services(cls, raw: Any) -> Any:
        # Parsed by tokenfleet.spec so errors read exactly as `tokenfleet validate` prints them.
        if not isinstance(raw, list):
            return raw
        parsed = []
        for i, document in enumerate(raw):
            if isinstance(document, LLMService):
                parsed.append(document)
                continue
            try:
                parsed.append(parse_service(document, f"services[{i}]"))
            except SpecError as exc:
                reasons = "; ".join(f"{path}: {reason}" for path, reason in exc.errors)
                raise ValueError(f"services[{i}] is not a valid LLMService: {reasons}") from None
        return parsed

    @model_validator(mode="after")
    def _cross_checks(self) -> Self:
        seen: set[tuple[str, str]] = set()
        for service in self.services:
            ns, name = self.namespace_of(service), service.metadata.name
            if ns in RESERVED_NAMESPACES or ns.startswith("kube-"):
                raise ValueError(
                    f"service {name!r}: namespace {ns!r} is reserved; use one tokenfleet creates "
                    "(it labels them Pod Security restricted)"
                )
            if ns in (self.monitoring.namespace, self.operator.namespace):
                raise ValueError(f"service {name!r}: namespace {ns!r} belongs to monitoring or the operator")
            if (ns, name) in seen:
                raise ValueError(f"service {ns}/{name} is listed twice")
            seen.add((ns, name))
            self._check_placement(service)
            if service.spec.gateway.api_keys_file:
                raise ValueError(
                    f"service {name!r}: gateway.apiKeysFile is a local path; on a cluster use apiKeysSecret"
                )
        load = self.load_generators
        if load.enabled:
            names = [s.metadata.name for s in self.services]
            if load.target is None or load.target not in names:
                raise ValueError(
                    f"loadGenerators.target must name one of the services {names}, got {load.target!r}"
                )
        return self

    def _check_placement(self, service: LLMService) -> None:
        engine, name = service.spec.engine, service.metadata.name
        cluster = self.cluster
        if engine.device == "cpu":
            if cluster.provider != "existing":
                raise ValueError(
                    f"service {name!r}: engine.device cpu runs only on the existing stack; "
                    f"{cluster.provider} stacks serve on their GPU pools"
                )
            return
        if not cluster.gpu_pools:
            raise ValueError(f"service {name!r} needs GPUs but cluster.gpuPools is empty")
        biggest = max(p.gpus_per_node for p in cluster.gpu_pools)
        if engine.gpus_per_replica > biggest:
            raise ValueError(
                f"service {name!r}: engine.gpusPerReplica {engine.gpus_per_replica} exceeds the largest "
                f"GPU node ({biggest} GPUs); one replica must fit on one node"
            )

    def namespace_of(self, service: LLMService) -> str:
        """The service's own namespace if its metadata names one, else servicesNamespace."""
        if "namespace" in service.metadata.model_fields_set:
            return service.metadata.namespace
        return self.services_namespace

    def service_namespaces(self) -> list[str]:
        """Where the operator serves LLMServices: the listed services' namespaces, and always
        servicesNamespace, so services applied later with kubectl are served there too."""
        return sorted({self.services_namespace, *(self.namespace_of(s) for s in self.services)})

    def tokenfleet_namespaces(self) -> list[str]:
        """Namespaces tokenfleet creates and labels Pod Security `restricted`."""
        names = [self.operator.namespace, *self.service_namespaces()]
        if self.load_generators.enabled:
            names.append(self.load_generators.namespace)
        return list(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class StackSecrets:
    """Secret config values, kept as Pulumi secret Outputs (never plain strings in the program)."""

    grafana_admin_password: pulumi.Output[str] | None = None
    hf_token: pulumi.Output[str] | None = None
    # Secret name -> YAML `{key: tenant}` text, one per gateway.apiKeysSecret to create.
    api_keys: pulumi.Output[dict[str, Any]] | None = None


class StackConfigError(ValueError):
    """A stack config that failed validation: one `(tokenfleet:key.path, reason)` per problem."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        lines = "\n".join(f"  {path}: {reason}" for path, reason in errors)
        super().__init__(f"invalid stack config ({len(errors)} error(s)):\n{lines}")


def _key_path(loc: tuple[int | str, ...]) -> str:
    # The discriminated union puts the tag into loc ('cluster', 'eks', 'region'): drop it.
    parts = [p for i, p in enumerate(loc) if not (i == 1 and loc[0] == "cluster" and p in PROVIDERS)]
    path = f"{PROJECT}:"
    for i, part in enumerate(parts):
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if i else "") + part
    return path if parts else f"{PROJECT}:(root)"


def _describe(model: type[BaseModel], loc: tuple[int | str, ...]) -> str | None:
    """The description of the field at `loc`, walking nested models (for 'Field required')."""
    current: Any = model
    description = None
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if part in PROVIDERS and current is _ClusterUnion:
            current = {"existing": ExistingCluster, "eks": EksCluster, "gke": GkeCluster}[part]
            continue
        fields = {f.alias or k: f for k, f in current.model_fields.items()}
        info = fields.get(str(part))
        if info is None:
            return None
        description = info.description
        current = _model_in(info.annotation)
    return description


class _ClusterUnion:
    """Marker: the next loc part names the cluster provider."""


def _model_in(annotation: Any) -> Any:
    if annotation is None:
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = getattr(annotation, "__args__", ())
    if {ExistingCluster, EksCluster, GkeCluster} <= set(args):
        return _ClusterUnion
    for arg in args:
        found = _model_in(arg)
        if found is not None:
            return found
    if getattr(annotation, "__metadata__", None) is not None:
        return _model_in(annotation.__origin__)
    return None


def _reason(model: type[BaseModel], err: Mapping[str, Any]) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    loc = tuple(err["loc"])
    if err["type"] == "missing":
        description = _describe(model, loc)
        return f"required key missing (expects {description})" if description else "required key missing"
    if err["type"] == "extra_forbidden":
        return "unknown key (check the spelling; keys are camelCase)"
    if err["type"] == "union_tag_invalid":
        return f"provider must be one of {', '.join(PROVIDERS)}"
    if err["type"] == "string_pattern_mismatch":
        description = _describe(model, loc)
        if description:
            return f"{msg} ({description})"
    return msg


def parse_stack_config(raw: Mapping[str, Any]) -> StackConfig:
    """Validate the `tokenfleet:*` keys (without the prefix) into a StackConfig."""
    data = {k: v for k, v in raw.items() if k not in SECRET_KEYS}
    try:
        return StackConfig.model_validate(data)
    except ValidationError as exc:
        # Unknown keys, top-level or nested, are reported by extra="forbid" like any other error.
        errors = [(_key_path(tuple(e["loc"])), _reason(StackConfig, e)) for e in exc.errors()]
        raise StackConfigError(errors) from None


def raw_config() -> dict[str, Any]:
    """Every `tokenfleet:*` key Pulumi passed to this program, JSON-decoded where it is structured."""
    # The language host sets config explicitly (set_all_config); older hosts pass PULUMI_CONFIG.
    keys = {*runtime_config.CONFIG.get(), *(runtime_config.get_config_env() or {})}
    raw: dict[str, Any] = {}
    for full_key in sorted(keys):
        project, _, key = full_key.partition(":")
        if project != PROJECT or key in SECRET_KEYS:
            continue
        value = runtime_config.get_config(full_key)
        try:
            raw[key] = json.loads(value)
        except ValueError:
            raw[key] = value  # a plain string value
    return raw


def load_stack_config() -> tuple[StackConfig, StackSecrets]:
    """Read and validate this stack's config (the program's only read of pulumi.Config)."""
    config = parse_stack_config(raw_config())
    pulumi_config = pulumi.Config(PROJECT)
    secrets = StackSecrets(
        grafana_admin_password=pulumi_config.get_secret("grafanaAdminPassword"),
        hf_token=pulumi_config.get_secret("hfToken"),
        api_keys=pulumi_config.get_secret_object("apiKeys"),
    )
    return config, secrets
