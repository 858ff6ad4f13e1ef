"""Stack config validation: every bad config fails before any resource, naming the key and why."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tokenfleet.infra.stackconfig import EksCluster, StackConfigError, check_pinned_image, parse_stack_config

# Pulumi needs an event loop in the main thread (see conftest.event_loop_for_pulumi).
pytestmark = pytest.mark.usefixtures("event_loop_for_pulumi")

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {
    "engineGpu": "ghcr.io/tokenfleet/tokenfleet-engine-gpu:0.1.0",
    "engineCpu": "ghcr.io/tokenfleet/tokenfleet-engine-cpu:0.1.0",
    "operator": "ghcr.io/tokenfleet/tokenfleet-operator:0.1.0",
    "gateway": "ghcr.io/tokenfleet/tokenfleet-gateway:0.1.0",
    "load": "ghcr.io/tokenfleet/tokenfleet-load@sha256:" + "a" * 64,
}
L4 = {"name": "l4", "instanceType": "g6.xlarge", "gpu": "nvidia-l4", "gpusPerNode": 1, "maxNodes": 4}
EKS = {"cluster": {"provider": "eks", "region": "us-west-2", "gpuPools": [L4]}, "images": IMAGES}
GPU_SERVICE = {
    "metadata": {"name": "chat", "namespace": "llm"},
    "spec": {"engine": {"device": "gpu", "gpusPerReplica": 1}},
}


def with_(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `base` with the dotted `path` set (or deleted when value is DELETE)."""
    config = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = config
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return config


DELETE = object()

# (config, the key the error names, words the reason contains)
BAD_CONFIGS: dict[str, tuple[dict[str, Any], str, str]] = {
    "no cluster": ({"images": IMAGES}, "tokenfleet:cluster", "required key missing (expects provider"),
    "unknown provider": (
        with_(EKS, "cluster.provider", "aks"),
        "tokenfleet:cluster",
        "provider must be one of existing, eks, gke",
    ),
    "pool without maxNodes": (
        with_(EKS, "cluster.gpuPools.0.maxNodes", DELETE),
        "tokenfleet:cluster.gpuPools[0].maxNodes",
        "required key missing (expects upper bound for the cluster autoscaler)",
    ),
    "pool min above max": (
        with_(EKS, "cluster.gpuPools.0.minNodes", 9),
        "tokenfleet:cluster.gpuPools[0]",
        "minNodes (9) must not exceed maxNodes (4)",
    ),
    "gpu not nvidia-<model>": (
        with_(EKS, "cluster.gpuPools.0.gpu", "L4"),
        "tokenfleet:cluster.gpuPools[0].gpu",
        "GPU model as nvidia-<model>",
    ),
    "duplicate pools": (
        with_(EKS, "cluster.gpuPools", [L4, L4]),
        "tokenfleet:cluster.gpuPools",
        "names must be unique",
    ),
    "eks without gpu pools": (
        with_(EKS, "cluster.gpuPools", []),
        "tokenfleet:cluster.gpuPools",
        "at least 1 item",
    ),
    "bad region": (with_(EKS, "cluster.region", "oregon"), "tokenfleet:cluster.region", "AWS region"),
    "vpc without subnets": (
        with_(EKS, "cluster.vpcId", "vpc-0abc"),
        "tokenfleet:cluster",
        "vpcId and subnetIds go together",
    ),
    "latest image": (
        with_(EKS, "images.operator", "ghcr.io/tokenfleet/tokenfleet-operator:latest"),
        "tokenfleet:images.operator",
        "uses :latest",
    ),
    "untagged image": (
        with_(EKS, "images.gateway", "ghcr.io/tokenfleet/tokenfleet-gateway"),
        "tokenfleet:images.gateway",
        "has no tag",
    ),
    "typo in a key": (
        with_(EKS, "monitoring.prometheusRetension", "15d"),
        "tokenfleet:monitoring.prometheusRetension",
        "unknown key",
    ),
    "typo at the top": (with_(EKS, "service", []), "tokenfleet:service", "unknown key"),
    "retention not a duration": (
        with_(EKS, "monitoring.prometheusRetention", "two weeks"),
        "tokenfleet:monitoring.prometheusRetention",
        "e.g. 15d",
    ),
    "storage not a quantity": (
        with_(EKS, "monitoring.traces.storage", "10 GB"),
        "tokenfleet:monitoring.traces.storage",
        "volume size",
    ),
    "invalid LLMService": (
        with_(EKS, "services", [{"metadata": {"name": "Bad_Name"}}]),
        "tokenfleet:services",
        "services[0] is not a valid LLMService: metadata.name",
    ),
    "cpu service on eks": (
        with_(EKS, "services", [{"metadata": {"name": "tiny", "namespace": "llm"}}]),
        "tokenfleet:(root)",
        "engine.device cpu runs only on the existing stack",
    ),
    "replica larger than any node": (
        with_(EKS, "services", [with_(GPU_SERVICE, "spec.engine.gpusPerReplica", 2)]),
        "tokenfleet:(root)",
        "gpusPerReplica 2 exceeds the largest GPU node (1 GPUs)",
    ),
    "gpu service without gpu pools": (
        {"cluster": {"provider": "existing"}, "images": IMAGES, "services": [GPU_SERVICE]},
        "tokenfleet:(root)",
        "needs GPUs but cluster.gpuPools is empty",
    ),
    "gpu pools without drivers": (
        {"cluster": {"provider": "existing", "gpuPools": [L4]}, "images": IMAGES},
        "tokenfleet:cluster",
        "gpuDrivers is none",
    ),
    "service in kube-system": (
        with_(EKS, "services", [with_(GPU_SERVICE, "metadata.namespace", "kube-system")]),
        "tokenfleet:(root)",
        "namespace 'kube-system' is reserved",
    ),
    "service twice": (
        with_(EKS, "services", [GPU_SERVICE, GPU_SERVICE]),
        "tokenfleet:(root)",
        "service llm/chat is listed twice",
    ),
    "local api keys file": (
        with_(
            EKS, "services", [with_(GPU_SERVICE, "spec.gateway", {"auth": True, "apiKeysFile": "keys.yaml"})]
        ),
        "tokenfleet:(root)",
        "apiKeysFile is a local path; on a cluster use apiKeysSecret",
    ),
    "load target unknown": (
        with_(EKS, "loadGenerators", {"enabled": True, "target": "nope"}),
        "tokenfleet:(root)",
        "loadGenerators.target must name one of the services",
    ),
    "unknown workload": (
        with_(EKS, "loadGenerators", {"workload": "tsunami"}),
        "tokenfleet:loadGenerators.workload",
        "unknown workload 'tsunami'; load/workloads/ has",
    ),
    "gke project id": (
        {
            "cluster": {
                "provider": "gke",
                "project": "My_Project",
                "location": "us-central1",
                "gpuPools": [L4],
            },
            "images": IMAGES,
        },
        "tokenfleet:cluster.project",
        "GCP project id",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_fails_naming_the_key_and_what_it_expects(case: str) -> None:
    config, key, reason = BAD_CONFIGS[case]
    with pytest.raises(StackConfigError) as caught:
        parse_stack_config(config)
    assert any(path == key and reason in why for path, why in caught.value.errors), caught.value.errors
    assert key in str(caught.value)  # the message printed by `pulumi up` names it too


def test_bad_config_count() -> None:
    assert len(BAD_CONFIGS) >= 10


@pytest.mark.parametrize("stack", ["existing", "eks", "gke"])
def test_example_stack_files_are_valid(stack: str) -> None:
    document = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())
    raw = {
        k.removeprefix("tokenfleet:"): v for k, v in document["config"].items() if k.startswith("tokenfleet:")
    }
    config = parse_stack_config(raw)
    assert config.cluster.provider == stack
    assert config.services, "every example serves something"


def test_defaults_fill_in_a_minimal_config() -> None:
    config = parse_stack_config(EKS)
    assert config.monitoring.namespace == "monitoring"
    assert config.monitoring.traces.retention == "72h"
    assert config.operator.namespace == "tokenfleet-system"
    assert isinstance(config.cluster, EksCluster)
    assert config.cluster.system_pool.instance_type == "m6i.xlarge"
    assert config.load_generators.enabled is False
    assert config.tokenfleet_namespaces() == ["tokenfleet-system", "tokenfleet"]
    listed = parse_stack_config(with_(EKS, "services", [GPU_SERVICE]))
    assert listed.service_namespaces() == ["llm", "tokenfleet"]  # servicesNamespace is always served


def test_services_default_to_the_services_namespace() -> None:
    config = parse_stack_config(with_(EKS, "services", [with_(GPU_SERVICE, "metadata.namespace", DELETE)]))
    assert config.namespace_of(config.services[0]) == "tokenfleet"
    assert config.tokenfleet_namespaces() == ["tokenfleet-system", "tokenfleet"]


@pytest.mark.parametrize(
    ("image", "ok"),
    [
        ("ghcr.io/x/y:1.2.3", True),
        ("localhost:5000/x/y:1.0", True),
        ("ghcr.io/x/y@sha256:" + "0" * 64, True),
        ("localhost:5000/x/y", False),  # the port is not a tag
        ("x/y:latest", False),
        ("y", False),
    ],
)
def test_pinned_image_rule(image: str, ok: bool) -> None:
    if ok:
        assert check_pinned_image(image) == image
    else:
        with pytest.raises(ValueError, match="pin it"):
            check_pinned_image(image)


def test_pulumi_project_runs_infra_main_in_the_venv() -> None:
    project = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())
    assert project["name"] == "tokenfleet"  # the `tokenfleet:` config namespace
    assert project["main"] == "infra/"
    assert project["runtime"] == {"name": "python", "options": {"toolchain": "pip", "virtualenv": ".venv"}}
    assert (ROOT / "infra" / "__main__.py").is_file()
