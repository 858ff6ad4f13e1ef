"""A wheel (what `pip install .` and the images install) carries every role, data files included.

The role folders reach the `tokenfleet` package through symlinks (tokenfleet/engine -> ../engine,
docs/adr/0012-role-folders-and-symlinks.md); this builds a wheel from a clean copy of the tree
and checks that each role's tracked modules and data files are inside it, under tokenfleet/<role>.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("engine", "operator", "infra", "kernels", "observability", "load")
# pyproject's package-data patterns plus the modules themselves.
PACKAGED_SUFFIXES = {".py", ".yaml", ".json", ".txt", ".html", ".js", ".md"}
# Data files the roles read at run time: if one of these is missing, a feature breaks.
MUST_HAVE = (
    "tokenfleet/operator/manifests/crd.yaml",
    "tokenfleet/observability/rules/tokenfleet.rules.yaml",
    "tokenfleet/observability/alertmanager/alertmanager.yaml",
    "tokenfleet/observability/dashboards/fleet.json",
    "tokenfleet/load/workloads/default.yaml",
)


def _tracked(role: str) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", role], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [
        name
        for name in listed.split("\0")
        if name and Path(name).suffix in PACKAGED_SUFFIXES and (ROOT / name).is_file()
    ]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    # A clean copy: building in the checkout would reuse its build/ folder, whose stale files
    # setuptools never removes.
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("tokenfleet", *ROLES):
        shutil.copytree(ROOT / folder, src / folder, symlinks=True, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("tokenfleet-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


@pytest.mark.parametrize("role", ROLES)
def test_every_role_file_is_in_the_wheel(wheel_names: set[str], role: str) -> None:
    files = _tracked(role)
    assert any(name.endswith(".py") for name in files)
    missing = [name for name in files if f"tokenfleet/{name}" not in wheel_names]
    assert missing == []


def test_runtime_data_files_and_the_builtin_model_package_are_in_the_wheel(wheel_names: set[str]) -> None:
    assert set(MUST_HAVE) <= wheel_names
    assert "tokenfleet/builtin_model/tiny_code.py" in wheel_names
    assert "tokenfleet/cli.py" in wheel_names


def test_no_role_is_a_top_level_package(wheel_names: set[str]) -> None:
    # `operator` would shadow the standard library and `kernels` a PyPI package (ARCHITECTURE.md).
    top = {name.split("/", 1)[0] for name in wheel_names}
    assert top == {"tokenfleet", "tokenfleet-0.1.0.dist-info"}
