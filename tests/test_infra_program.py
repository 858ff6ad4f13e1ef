"""The Pulumi program for each stack, run through Pulumi's mocks (no CLI, no cluster, no cloud).

`program()` runs once per stack (module fixture); the mocks record every resource registration
with the inputs the provider would receive. The tests assert the graph as policy: node pool
taints and labels, GPU requests, pinned charts, probes, non-root restricted pods, no `:latest`,
RBAC scope, NetworkPolicies, exports; and every Kubernetes object is validated with
kubernetes-validate against Kubernetes 1.33 (strict: unknown fields fail).
"""

from __future__ import annotations

import copy
import json
import runpy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pulumi
import pytest
import yaml
from pulumi.runtime import rpc

from tokenfleet.infra import charts
from tokenfleet.infra.program import Stack, program
from tokenfleet.infra.stackconfig import StackConfigError, StackSecrets, load_stack_config, parse_stack_config
from tokenfleet.operator.crd import crd_manifest
from tokenfleet.operator.model import ControlDecision, Conventions, Observed
from tokenfleet.operator.reconcile import desired_objects
from tokenfleet.spec import parse_service

# Pulumi needs an event loop in the main thread (see conftest.event_loop_for_pulumi).
pytestmark = [
    pytest.mark.usefixtures("event_loop_for_pulumi"),
    pytest.mark.filterwarnings("error::pytest.PytestReturnNotNoneWarning"),
]

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.33"
# Kinds the program creates that are custom resources: kubernetes-validate has no schema for them.
CUSTOM_KINDS = {"LLMService", "ServiceMonitor", "PrometheusRule"}


@dataclass
class Registration:
    typ: str
    name: str
    inputs: dict[str, Any]
    provider: str


@dataclass
class Recorder(pulumi.runtime.Mocks):
    resources: list[Registration] = field(default_factory=list)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(Registration(args.typ, args.name, dict(args.inputs), args.provider or ""))
        # Echo the inputs as outputs, minus resource references (pulumi-eks node groups take the
        # cluster and role objects): deserialising those would rehydrate resources after the run.
        outputs = {k: v for k, v in args.inputs.items() if not isinstance(v, pulumi.Resource)}
        if args.typ == "aws:iam/role:Role":
            outputs["arn"] = f"arn:aws:iam::123456789012:role/{args.name}"
        if args.typ == "eks:index:Cluster":
            outputs["kubeconfigJson"] = json.dumps({"kind": "Config", "clusters": [{"name": args.name}]})
        if args.typ == "gcp:container/cluster:Cluster":
            outputs.update(
                name=args.name, endpoint="203.0.113.10", masterAuth={"clusterCaCertificate": "Q0EK"}
            )
        return f"{args.name}_id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        # The eks stack without a configured VPC looks up the default VPC and its subnets.
        if args.token == "aws:ec2/getVpc:getVpc":
            return {"id": "vpc-0default"}
        if args.token == "aws:ec2/getSubnets:getSubnets":
            return {"ids": ["subnet-a", "subnet-b"]}
        return {}

    def of_type(self, typ: str) -> list[Registration]:
        return [r for r in self.resources if r.typ == typ]

    def manifests(self) -> list[dict[str, Any]]:
        """Every Kubernetes object (not Helm releases, not the provider) as the provider gets it."""
        out = []
        for r in self.resources:
            if r.typ.startswith("kubernetes:") and "helm.sh" not in r.typ and "providers" not in r.typ:
                out.append(_ints(r.inputs))
        return out

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests() if m["kind"] == kind]


SECRET_SIG = (rpc._special_sig_key, rpc._special_secret_sig)


def is_secret_value(value: Any) -> bool:
    """Pulumi secrets reach the mocks wrapped as {<sig key>: <secret sig>, "value": ...}."""
    return isinstance(value, dict) and value.get(SECRET_SIG[0]) == SECRET_SIG[1]


def _ints(value: Any) -> Any:
    # Numbers cross the gRPC boundary as protobuf doubles; the provider sends 8000.0 as 8000.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if is_secret_value(value):
        return _ints(value["value"])
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


@dataclass
class Run:
    stack: Stack
    recorder: Recorder
    exports: dict[str, Any]
    resolved: dict[str, Any]


def stack_file_config(name: str) -> dict[str, Any]:
    """The `tokenfleet:*` keys of the example Pulumi.<name>.yaml, without the prefix."""
    document = yaml.safe_load((ROOT / f"Pulumi.{name}.yaml").read_text())
    return {
        k.removeprefix("tokenfleet:"): v for k, v in document["config"].items() if k.startswith("tokenfleet:")
    }


def secrets(**extra: Any) -> StackSecrets:
    return StackSecrets(grafana_admin_password=pulumi.Output.secret("s3cret-admin"), **extra)


EXISTING_GPU = {
    "cluster": {
        "provider": "existing",
        "gpuDrivers": "device-plugin",
        "gpuPools": [
            {"name": "a100", "instanceType": "n/a", "gpu": "nvidia-a100", "gpusPerNode": 8, "maxNodes": 2}
        ],
    },
    "images": stack_file_config("existing")["images"],
    "services": [
        {
            "metadata": {"name": "big", "namespace": "llm"},
            "spec": {"engine": {"device": "gpu", "gpusPerReplica": 4, "tensorParallelSize": 4}},
        },
        {"metadata": {"name": "small", "namespace": "cpu-llm"}},
    ],
    "hfTokenSecret": {"name": "hf", "key": "token"},
}


def run_program(
    name: str, raw: dict[str, Any], stack_secrets: StackSecrets, monkeypatch: pytest.MonkeyPatch
) -> Run:
    recorder = Recorder()
    pulumi.runtime.set_mocks(recorder, project="tokenfleet", stack=name, preview=False)
    exports: dict[str, Any] = {}
    monkeypatch.setattr(pulumi, "export", lambda key, value: exports.__setitem__(key, value))
    config = parse_stack_config(raw)
    holder: dict[str, Any] = {}

    @pulumi.runtime.test
    def build() -> pulumi.Output[Any]:
        holder["stack"] = program(config, stack_secrets, stack=name)
        keys = sorted(exports)
        return pulumi.Output.all(*(exports[k] for k in keys)).apply(
            lambda values: holder.__setitem__("resolved", dict(zip(keys, values, strict=True)))
        )

    build()
    return Run(holder["stack"], recorder, exports, holder["resolved"])


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, Run]]:
    with pytest.MonkeyPatch.context() as mp:
        api_keys = pulumi.Output.secret({"qwen-7b-api-keys": {"k-123": "search"}})
        yield {
            "existing": run_program("existing", stack_file_config("existing"), secrets(), mp),
            "eks": run_program("eks", stack_file_config("eks"), secrets(api_keys=api_keys), mp),
            "gke": run_program("gke", stack_file_config("gke"), secrets(), mp),
            "existing-gpu": run_program(
                "existing-gpu", EXISTING_GPU, secrets(hf_token=pulumi.Output.secret("hf_abc")), mp
            ),
        }


ALL = ["existing", "eks", "gke", "existing-gpu"]


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    spec = manifest["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def workloads(run: Run) -> list[dict[str, Any]]:
    return run.recorder.kind("Deployment") + run.recorder.kind("Job")


# --- cluster and node pools ------------------------------------------------------------------


def test_eks_node_groups_have_gpu_taints_labels_and_bounds(runs: dict[str, Run]) -> None:
    groups = {r.name: r.inputs for r in runs["eks"].recorder.of_type("aws:eks/nodeGroup:NodeGroup")}
    assert set(groups) == {"tokenfleet-system", "tokenfleet-l4", "tokenfleet-l4x4"}
    assert {g["clusterName"] for g in groups.values()} == {"tokenfleet-eks"}
    assert all(g["subnetIds"] == ["subnet-a", "subnet-b"] for g in groups.values())
    assert {g["nodeRoleArn"] for g in groups.values()} == {"arn:aws:iam::123456789012:role/tokenfleet-nodes"}
    l4x4 = groups["tokenfleet-l4x4"]
    assert l4x4["instanceTypes"] == ["g6.12xlarge"]
    assert l4x4["amiType"] == "AL2023_x86_64_NVIDIA"
    assert l4x4["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}]
    assert l4x4["labels"]["tokenfleet.dev/gpu-pool"] == "l4x4"
    assert l4x4["labels"]["nvidia.com/gpu.present"] == "true"
    assert l4x4["scalingConfig"] == {"minSize": 0, "maxSize": 2, "desiredSize": 0}
    system = groups["tokenfleet-system"]
    assert "taints" not in system
    assert system["amiType"] == "AL2023_x86_64_STANDARD"
    assert system["scalingConfig"]["minSize"] == 2
    (cluster,) = runs["eks"].recorder.of_type("eks:index:Cluster")
    assert cluster.inputs["skipDefaultNodeGroup"] is True
    assert cluster.inputs["version"] == "1.33"


def test_gke_node_pools_have_accelerators_taints_and_autoscaling(runs: dict[str, Run]) -> None:
    pools = {r.name: r.inputs for r in runs["gke"].recorder.of_type("gcp:container/nodePool:NodePool")}
    assert set(pools) == {"tokenfleet-system", "tokenfleet-l4"}
    l4 = pools["tokenfleet-l4"]
    node = l4["nodeConfig"]
    assert node["guestAccelerators"][0]["type"] == "nvidia-l4"
    assert node["guestAccelerators"][0]["count"] == 1
    assert node["guestAccelerators"][0]["gpuDriverInstallationConfig"]["gpuDriverVersion"] == "DEFAULT"
    assert node["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}]
    assert node["labels"]["tokenfleet.dev/gpu-pool"] == "l4"
    assert l4["autoscaling"] == {"minNodeCount": 0, "maxNodeCount": 8}
    assert "guestAccelerators" not in pools["tokenfleet-system"]["nodeConfig"]
    (cluster,) = runs["gke"].recorder.of_type("gcp:container/cluster:Cluster")
    assert cluster.inputs["removeDefaultNodePool"] is True
    assert cluster.inputs["datapathProvider"] == "ADVANCED_DATAPATH"  # enforces NetworkPolicies


def test_existing_stack_adopts_the_cluster_without_cloud_resources(runs: dict[str, Run]) -> None:
    types = {r.typ for r in runs["existing"].recorder.resources}
    assert not any(t.startswith(("aws:", "eks:", "gcp:")) for t in types)
    (provider,) = runs["existing"].recorder.of_type("pulumi:providers:kubernetes")
    assert provider.inputs["context"] == "kind-tokenfleet"


def test_every_kubernetes_object_uses_the_cluster_provider(runs: dict[str, Run]) -> None:
    for name in ALL:
        for r in runs[name].recorder.resources:
            if r.typ.startswith("kubernetes:"):
                assert "pulumi:providers:kubernetes" in r.provider, (name, r.typ, r.name)


# --- drivers ---------------------------------------------------------------------------------


def test_device_plugin_release_only_where_the_cloud_does_not_run_one(runs: dict[str, Run]) -> None:
    def plugin(name: str) -> list[Registration]:
        return [
            r
            for r in runs[name].recorder.of_type("kubernetes:helm.sh/v3:Release")
            if r.inputs["chart"] == "nvidia-device-plugin"
        ]

    assert len(plugin("eks")) == 1
    assert len(plugin("existing-gpu")) == 1
    assert plugin("gke") == []
    assert plugin("existing") == []
    values = plugin("eks")[0].inputs["values"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in values["tolerations"]


def test_gpu_check_job_requests_the_pools_gpus_on_that_pool(runs: dict[str, Run]) -> None:
    jobs = {j["metadata"]["name"]: j for j in runs["eks"].recorder.kind("Job")}
    assert set(jobs) == {"gpu-check-l4", "gpu-check-l4x4"}
    pod = jobs["gpu-check-l4x4"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"tokenfleet.dev/gpu-pool": "l4x4"}
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "4"
    assert resources["requests"]["nvidia.com/gpu"] == "4"
    assert runs["existing"].recorder.kind("Job") == []


# --- helm charts -----------------------------------------------------------------------------


def test_every_helm_release_is_pinned_to_the_version_in_charts(runs: dict[str, Run]) -> None:
    pinned = {c.name: (c.version, c.repo) for c in charts.ALL}
    for name in ALL:
        releases = runs[name].recorder.of_type("kubernetes:helm.sh/v3:Release")
        assert {r.inputs["chart"] for r in releases} >= {
            "kube-prometheus-stack",
            "tempo",
            "opentelemetry-collector",
        }
        for r in releases:
            assert (r.inputs["version"], r.inputs["repositoryOpts"]["repo"]) == pinned[r.inputs["chart"]]
            assert r.inputs["version"][0].isdigit()  # an exact version, not a range or "latest"


def test_monitoring_values_come_from_config(runs: dict[str, Run]) -> None:
    releases = {
        r.inputs["chart"]: r.inputs for r in runs["eks"].recorder.of_type("kubernetes:helm.sh/v3:Release")
    }
    prom = releases["kube-prometheus-stack"]["values"]["prometheus"]["prometheusSpec"]
    assert prom["retention"] == "15d"
    claim = prom["storageSpec"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "50Gi"
    assert claim["storageClassName"] == "gp3"
    assert prom["serviceMonitorSelectorNilUsesHelmValues"] is False  # the operator's monitors count too
    grafana = releases["kube-prometheus-stack"]["values"]["grafana"]
    assert grafana["admin"]["existingSecret"] == "grafana-admin"
    assert grafana["sidecar"]["dashboards"]["label"] == "grafana_dashboard"
    tempo = releases["tempo"]["values"]
    assert tempo["tempo"]["retention"] == "72h"
    assert tempo["persistence"]["size"] == "20Gi"
    assert tempo["tempo"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    otel = releases["opentelemetry-collector"]["values"]
    assert otel["config"]["exporters"]["otlp"]["endpoint"] == "tempo.monitoring.svc:4317"
    assert ":" not in otel["image"]["repository"]
    assert otel["image"]["tag"][0].isdigit()


def test_dashboards_and_rules_are_the_repositorys_own(runs: dict[str, Run]) -> None:
    from tokenfleet.observability import grafana, prometheusrule

    recorder = runs["gke"].recorder
    boards = [
        c for c in recorder.kind("ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    assert len(boards) == len(grafana.DASHBOARDS)
    shipped = {json.loads(next(iter(c["data"].values())))["uid"] for c in boards}
    assert shipped == {build()["uid"] for build in grafana.DASHBOARDS.values()}
    (rule,) = recorder.kind("PrometheusRule")
    assert rule["spec"]["groups"] == _ints(prometheusrule.load_groups())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# --- operator --------------------------------------------------------------------------------


def test_operator_crd_is_the_generated_one_and_the_deployment_is_single_recreate(
    runs: dict[str, Run],
) -> None:
    recorder = runs["eks"].recorder
    (crd,) = recorder.kind("CustomResourceDefinition")
    assert crd["spec"] == _ints(crd_manifest()["spec"])
    (operator,) = [d for d in recorder.kind("Deployment") if d["metadata"]["name"] == "tokenfleet-operator"]
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["tokenfleet"]
    assert container["args"][:3] == ["operator", "run", "--metrics-port=9090"]
    assert [a for a in container["args"] if a.startswith("--namespace=")] == [
        "--namespace=llm",
        "--namespace=tokenfleet",
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TOKENFLEET_GATEWAY_IMAGE"] == "ghcr.io/tokenfleet/tokenfleet-gateway:0.1.0"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4318")
    (monitor,) = [
        m for m in recorder.kind("ServiceMonitor") if m["metadata"]["name"] == "tokenfleet-operator"
    ]
    (svc,) = [s for s in recorder.kind("Service") if s["metadata"]["name"] == "tokenfleet-operator-metrics"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= operator["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("name", ALL)
def test_services_send_their_traces_to_the_stacks_collector(runs: dict[str, Run], name: str) -> None:
    """infra tells the operator the collector's OTLP/HTTP Service; the gateway and engine pods the
    operator renders from that environment export there, and every NetworkPolicy on the way
    (the namespace's allow-otlp and the operator's own) lets the spans out."""
    run = runs[name]
    collector = "http://otel-collector-opentelemetry-collector.monitoring.svc:4318"
    assert run.stack.monitoring.otlp_endpoint == collector
    (operator,) = [
        d for d in run.recorder.kind("Deployment") if d["metadata"]["name"] == "tokenfleet-operator"
    ]
    container = operator["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == collector
    # The collector listens for OTLP/HTTP on that port (the chart's Service maps it 1:1).
    releases = {r.inputs["chart"]: r.inputs for r in run.recorder.of_type("kubernetes:helm.sh/v3:Release")}
    otel = releases["opentelemetry-collector"]
    assert otel["name"] == "otel-collector"
    assert otel["namespace"] == "monitoring"
    assert otel["values"]["config"]["receivers"]["otlp"]["protocols"]["http"]["endpoint"] == "0.0.0.0:4318"
    conventions = Conventions.from_env(env)
    policies = run.recorder.kind("NetworkPolicy")
    to_collector = {
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"protocol": "TCP", "port": 4318}],
    }
    services = run.recorder.kind("LLMService")
    assert services
    for document in services:
        service = parse_service(document)
        ns = service.metadata.namespace
        (allow,) = [
            p for p in policies if p["metadata"]["name"] == "allow-otlp" and p["metadata"]["namespace"] == ns
        ]
        assert allow["spec"]["podSelector"] == {}  # every pod of the namespace, the operator's too
        assert {"protocol": "TCP", "port": 4318} in allow["spec"]["egress"][0]["ports"]
        assert allow["spec"]["egress"][0]["to"] == to_collector["to"]
        objects = desired_objects(service, Observed(uid="u"), ControlDecision(stable_replicas=1), conventions)
        for obj in objects:
            if obj["kind"] != "ServiceMonitor":
                assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION
        rendered = {(o["kind"], o["metadata"]["name"]): o for o in objects}
        engine = rendered["Deployment", f"{service.metadata.name}-engine"]["spec"]["template"]["spec"]
        argv = engine["containers"][0]["command"]
        assert argv[argv.index("--otlp-traces-endpoint") + 1] == f"{collector}/v1/traces"
        gateway = rendered["Deployment", f"{service.metadata.name}-gateway"]["spec"]["template"]["spec"]
        gateway_env = {e["name"]: e["value"] for e in gateway["containers"][0]["env"]}
        assert gateway_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == collector
        for component in ("engine", "gateway"):
            policy = rendered["NetworkPolicy", f"{service.metadata.name}-{component}"]
            assert to_collector in policy["spec"]["egress"]


def test_operator_may_reach_the_api_server_prometheus_and_its_services_only(runs: dict[str, Run]) -> None:
    (policy,) = [
        p
        for p in runs["eks"].recorder.kind("NetworkPolicy")
        if p["metadata"]["name"] == "tokenfleet-operator"
    ]
    api, prometheus, services = policy["spec"]["egress"]
    assert "to" not in api  # the API server is no pod: by port only
    assert {p["port"] for p in api["ports"]} == {443, 6443}
    assert prometheus["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    reached = [t["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for t in services["to"]]
    assert reached == ["llm", "tokenfleet"]
    assert {p["port"] for p in services["ports"]} == {8000}
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 9090}]


def test_rbac_is_least_privilege(runs: dict[str, Run]) -> None:
    recorder = runs["eks"].recorder
    (cluster_role,) = recorder.kind("ClusterRole")
    # Namespaced permissions are Roles in the watched namespaces, not cluster-wide.
    cluster_resources = {res for rule in cluster_role["rules"] for res in rule["resources"]}
    assert cluster_resources == {"customresourcedefinitions", "namespaces"}
    assert {v for rule in cluster_role["rules"] for v in rule["verbs"]} == {"list", "watch"}
    roles = recorder.kind("Role")
    assert [r["metadata"]["namespace"] for r in roles] == ["llm", "tokenfleet"]
    for role in [cluster_role, *roles]:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"]
            assert "*" not in rule["resources"]
            assert "*" not in rule["apiGroups"]
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
            if "secrets" in rule["resources"]:
                assert rule["verbs"] == ["get"]
    bindings = recorder.kind("RoleBinding")
    assert [b["metadata"]["namespace"] for b in bindings] == ["llm", "tokenfleet"]
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "tokenfleet-operator", "namespace": "tokenfleet-system"}
        ]


# --- services --------------------------------------------------------------------------------


def test_llmservices_are_valid_crs_completed_for_the_cluster(runs: dict[str, Run]) -> None:
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    (svc,) = runs["eks"].recorder.kind("LLMService")
    jsonschema.Draft4Validator(schema).validate(svc)  # OpenAPI v3 schemas: draft-4 style bounds
    assert svc["metadata"] == {"name": "qwen-7b", "namespace": "llm"}
    engine = svc["spec"]["engine"]
    assert engine["image"] == "ghcr.io/tokenfleet/tokenfleet-engine-gpu:0.1.0"  # not the stock vLLM image
    assert [p["name"] for p in engine["gpuPools"]] == ["l4", "l4x4"]
    assert engine["gpuPools"][0]["nodeSelector"] == {"tokenfleet.dev/gpu-pool": "l4"}
    assert engine["gpuPools"][0]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    # 4 GPUs per replica fit only the 8-GPU pool; the CPU service gets the CPU image and no pools.
    big, small = sorted(runs["existing-gpu"].recorder.kind("LLMService"), key=lambda s: s["metadata"]["name"])
    assert [p["name"] for p in big["spec"]["engine"]["gpuPools"]] == ["a100"]
    assert small["spec"]["engine"]["image"] == "ghcr.io/tokenfleet/tokenfleet-engine-cpu:0.1.0"
    assert "gpuPools" not in small["spec"]["engine"]
    (default_ns,) = runs["existing"].recorder.kind("LLMService")
    assert default_ns["metadata"]["namespace"] == "tokenfleet"


def test_api_keys_and_hf_token_are_secrets_referenced_never_inlined(runs: dict[str, Run]) -> None:
    (svc,) = runs["eks"].recorder.kind("LLMService")
    assert svc["spec"]["gateway"]["apiKeysSecret"] == "qwen-7b-api-keys"
    (keys,) = [s for s in runs["eks"].recorder.kind("Secret") if s["metadata"]["name"] == "qwen-7b-api-keys"]
    (raw,) = [r for r in runs["eks"].recorder.of_type("kubernetes:core/v1:Secret") if "api-keys" in r.name]
    assert is_secret_value(raw.inputs["stringData"])  # stays a Pulumi secret up to the provider
    assert keys["metadata"]["namespace"] == "llm"
    assert yaml.safe_load(keys["stringData"]["keys.yaml"]) == {"k-123": "search"}
    hf = [s for s in runs["existing-gpu"].recorder.kind("Secret") if s["metadata"]["name"] == "hf"]
    assert {s["metadata"]["namespace"] for s in hf} == {"llm", "cpu-llm", "tokenfleet"}
    operator = next(
        d
        for d in runs["existing-gpu"].recorder.kind("Deployment")
        if d["metadata"]["name"] == "tokenfleet-operator"
    )
    env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TOKENFLEET_HF_TOKEN_SECRET"] == "hf/token"
    # No secret value appears anywhere but in its Secret's stringData.
    for name, secret_value in (("eks", "k-123"), ("existing-gpu", "hf_abc"), ("eks", "s3cret-admin")):
        for manifest in runs[name].recorder.manifests():
            if manifest["kind"] != "Secret":
                assert secret_value not in json.dumps(manifest), manifest["metadata"]
        for release in runs[name].recorder.of_type("kubernetes:helm.sh/v3:Release"):
            assert secret_value not in json.dumps(release.inputs["values"])


# --- pod policy ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_pods_are_non_root_unprivileged_and_pinned(runs: dict[str, Run], name: str) -> None:
    for manifest in workloads(runs[name]):
        pod = manifest["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in containers(manifest):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc.get("privileged") is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "add" not in sc["capabilities"]
            assert sc["readOnlyRootFilesystem"] is True
            image = c["image"]
            assert not image.endswith(":latest")
            assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image
            assert "memory" in c["resources"]["limits"], (manifest["metadata"]["name"], c["name"])


@pytest.mark.parametrize("name", ALL)
def test_long_running_containers_have_probes(runs: dict[str, Run], name: str) -> None:
    deployments = runs[name].recorder.kind("Deployment")
    assert deployments
    for manifest in deployments:
        for c in manifest["spec"]["template"]["spec"]["containers"]:
            where = (manifest["metadata"]["name"], c["name"])
            assert "livenessProbe" in c, where
            assert "readinessProbe" in c, where


@pytest.mark.parametrize("name", ALL)
def test_tokenfleet_namespaces_are_restricted_and_default_deny(runs: dict[str, Run], name: str) -> None:
    run = runs[name]
    namespaces = {n["metadata"]["name"]: n["metadata"]["labels"] for n in run.recorder.kind("Namespace")}
    policies = run.recorder.kind("NetworkPolicy")
    deny = {p["metadata"]["namespace"] for p in policies if p["metadata"]["name"] == "default-deny"}
    dns = {p["metadata"]["namespace"] for p in policies if p["metadata"]["name"] == "allow-dns"}
    restricted = {
        ns for ns, lab in namespaces.items() if lab["pod-security.kubernetes.io/enforce"] == "restricted"
    }
    expected = {"tokenfleet-system", "tokenfleet"} | {
        s["metadata"]["namespace"] for s in run.recorder.kind("LLMService")
    }
    if run.stack.load is not None:
        expected.add("tokenfleet-load")
    assert restricted == expected == deny == dns
    # Only the chart namespaces (node-exporter, device plugin) are privileged, and nothing of ours runs there.
    assert set(namespaces) - restricted <= {"monitoring", "nvidia-device-plugin"}
    for manifest in workloads(run):
        assert manifest["metadata"]["namespace"] in restricted
    for p in policies:
        if p["metadata"]["name"] == "default-deny":
            assert p["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_locust_ui_is_cluster_internal_and_runs_the_repository_locustfile(runs: dict[str, Run]) -> None:
    recorder = runs["existing"].recorder
    (svc,) = [s for s in recorder.kind("Service") if s["metadata"]["name"] == "locust-master"]
    assert svc["spec"]["type"] == "ClusterIP"
    deployments = {d["metadata"]["name"]: d for d in recorder.kind("Deployment")}
    master = deployments["locust-master"]["spec"]["template"]["spec"]["containers"][0]
    assert "--master" in master["args"]
    assert master["args"][1] == "/app/load/locustfiles/tokenfleet_llm.py"
    assert (
        master["args"][master["args"].index("--host") + 1]
        == "http://tiny-code.tokenfleet.svc.cluster.local:8000"
    )
    assert deployments["locust-worker"]["spec"]["replicas"] == 1
    (config,) = [c for c in recorder.kind("ConfigMap") if c["metadata"]["name"] == "locust-config"]
    bench = json.loads(config["data"]["bench-config.json"])
    assert bench["model"] == "tiny-code"
    assert bench["workers"] == 1
    assert bench["workload"]["name"] == "default"
    (policy,) = [p for p in recorder.kind("NetworkPolicy") if p["metadata"]["name"] == "locust"]
    egress_ports = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
    assert egress_ports == {5557, 8000}
    assert runs["gke"].stack.load is None
    assert not [d for d in runs["gke"].recorder.kind("Deployment") if "locust" in d["metadata"]["name"]]


# --- manifests validate ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_every_manifest_validates_against_kubernetes_1_33_strict(runs: dict[str, Run], name: str) -> None:
    checked = 0
    for manifest in runs[name].recorder.manifests():
        if manifest["kind"] in CUSTOM_KINDS:
            continue
        assert kubernetes_validate.validate(manifest, K8S_VERSION, strict=True) == K8S_VERSION
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("name", ALL)
def test_custom_resources_match_their_schemas(runs: dict[str, Run], name: str) -> None:
    """kubernetes-validate skips custom kinds: LLMServices are checked against the CRD's own
    schema; the prometheus-operator kinds (no schema here) for the fields their operator reads."""
    recorder = runs[name].recorder
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for service in recorder.kind("LLMService"):
        jsonschema.Draft4Validator(schema).validate(service)
    services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in recorder.kind("Service")}
    for monitor in recorder.kind("ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        (ns,) = monitor["spec"]["namespaceSelector"]["matchNames"]
        # The endpoint's named port exists on a Service the selector matches.
        matched = [
            svc
            for (svc_ns, _), svc in services.items()
            if svc_ns == ns
            and monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        ]
        assert matched, monitor["metadata"]["name"]
        port_names = {p["name"] for svc in matched for p in svc["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    (rule,) = recorder.kind("PrometheusRule")
    for group in rule["spec"]["groups"]:
        assert group["name"]
        assert group["rules"]
        assert all(("alert" in r) != ("record" in r) and r["expr"] for r in group["rules"])


def test_validation_catches_a_broken_manifest(runs: dict[str, Run]) -> None:
    (operator,) = [
        d for d in runs["eks"].recorder.kind("Deployment") if d["metadata"]["name"] == "tokenfleet-operator"
    ]
    broken = copy.deepcopy(operator)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="Additional properties"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# --- outputs ---------------------------------------------------------------------------------


def test_outputs_are_exported_and_the_kubeconfig_is_secret(runs: dict[str, Run]) -> None:
    eks = runs["eks"].resolved
    assert eks["gatewayEndpoint"] == "http://qwen-7b.llm.svc.cluster.local:8000"
    assert eks["grafanaUrl"] == "http://kube-prometheus-stack-grafana.monitoring.svc"
    assert eks["locustUi"] == "http://locust-master.tokenfleet-load.svc.cluster.local:8089"
    assert "port-forward svc/locust-master 8089:8089" in eks["locustPortForward"]
    assert json.loads(eks["kubeconfig"])["clusters"][0]["name"] == "tokenfleet"
    assert eks["gpuPools"]["l4"]["hourlyUsd"] == pytest.approx(0.8048)
    gke = runs["gke"].resolved
    assert json.loads(gke["kubeconfig"])["users"][0]["user"]["exec"]["command"] == "gke-gcloud-auth-plugin"
    assert "locustUi" not in gke


@pulumi.runtime.test
def test_kubeconfig_output_is_marked_secret(runs: dict[str, Run]) -> Any:
    kubeconfig = runs["eks"].exports["kubeconfig"]

    def check(flag: bool) -> None:
        assert flag is True

    return pulumi.Output.from_input(kubeconfig.is_secret()).apply(check)


# --- config through Pulumi ---------------------------------------------------------------------


def test_load_stack_config_reads_pulumi_config_and_secrets() -> None:
    pulumi.runtime.set_mocks(Recorder(), project="tokenfleet", stack="existing", preview=False)
    raw = stack_file_config("existing")
    pulumi.runtime.set_all_config(
        {
            **{f"tokenfleet:{k}": json.dumps(v) for k, v in raw.items()},
            "tokenfleet:servicesNamespace": "llm-dev",  # a plain string value
            "tokenfleet:grafanaAdminPassword": "pw",
            "aws:region": "us-west-2",  # another provider's key is ignored
        },
        ["tokenfleet:grafanaAdminPassword"],
    )
    try:
        config, stack_secrets = load_stack_config()
        assert config.services_namespace == "llm-dev"
        assert config.cluster.provider == "existing"
        assert stack_secrets.grafana_admin_password is not None
        assert stack_secrets.hf_token is None
        pulumi.runtime.set_all_config(
            {**{f"tokenfleet:{k}": json.dumps(v) for k, v in raw.items()}, "tokenfleet:imagez": "{}"}
        )
        with pytest.raises(StackConfigError, match=r"tokenfleet:imagez: unknown key"):
            load_stack_config()
    finally:
        pulumi.runtime.set_all_config({})


def test_program_refuses_to_run_without_the_grafana_password() -> None:
    pulumi.runtime.set_mocks(Recorder(), project="tokenfleet", stack="existing", preview=False)
    config = parse_stack_config(stack_file_config("existing"))
    with pytest.raises(StackConfigError, match=r"tokenfleet:grafanaAdminPassword: required secret missing"):
        program(config, StackSecrets(), stack="existing")
    hf_config = parse_stack_config({**stack_file_config("existing"), "hfTokenSecret": {"name": "hf"}})
    with pytest.raises(StackConfigError, match=r"tokenfleet:hfToken: hfTokenSecret names 'hf'"):
        program(hf_config, secrets(), stack="existing")


def test_main_runs_the_program_from_pulumi_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """infra/__main__.py, as `pulumi up` runs it: config from Pulumi, then the whole program."""
    recorder = Recorder()
    pulumi.runtime.set_mocks(recorder, project="tokenfleet", stack="existing", preview=False)
    exports: dict[str, Any] = {}
    monkeypatch.setattr(pulumi, "export", lambda key, value: exports.__setitem__(key, value))
    raw = stack_file_config("existing")
    pulumi.runtime.set_all_config(
        {
            **{f"tokenfleet:{k}": json.dumps(v) for k, v in raw.items()},
            "tokenfleet:grafanaAdminPassword": "pw",
        },
        ["tokenfleet:grafanaAdminPassword"],
    )

    @pulumi.runtime.test
    def main() -> None:
        runpy.run_path(str(ROOT / "infra" / "__main__.py"), run_name="__main__")

    try:
        main()
    finally:
        pulumi.runtime.set_all_config({})
    assert {"gatewayEndpoint", "grafanaUrl", "locustUi", "kubeconfig"} <= set(exports)
    assert [s["metadata"]["name"] for s in recorder.kind("LLMService")] == ["tiny-code"]
    (grafana,) = [s for s in recorder.of_type("kubernetes:core/v1:Secret") if "grafana" in s.name]
    assert is_secret_value(grafana.inputs["stringData"])
