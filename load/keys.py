"""Each workload tenant's API key: the load harness authenticates as the tenant, because the
gateway attributes a request to a tenant by its key and by nothing the client says.

`tenant_keys` is pure; `resolve_tenant_keys` reads the environment and the keys file. The keys
file has the gateway's own format (`engine/gateway/tenancy.py` parses both).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from tokenfleet.engine.gateway.tenancy import KeyFileError, parse_keys
from tokenfleet.load.workload import Workload


class TenantKeyError(ValueError):
    """A tenant's key cannot be found; the message names the tenant and where it looked."""


def tenant_keys(
    workload: Workload, environ: Mapping[str, str], key_file: Mapping[str, str] | None
) -> dict[str, str]:
    """{tenant: key} for every tenant that has a key source; tenants without one send no key.

    `key_file` is the parsed `apiKeysFile` ({key: tenant}); a tenant named there twice is
    ambiguous, so it is an error rather than a silent pick.
    """
    by_tenant: dict[str, list[str]] = {}
    for key, owner in (key_file or {}).items():
        by_tenant.setdefault(owner, []).append(key)
    keys: dict[str, str] = {}
    for tenant in workload.tenants:
        if tenant.api_key_env is not None:
            value = environ.get(tenant.api_key_env, "")
            if not value:
                raise TenantKeyError(
                    f"tenant {tenant.name!r}: environment variable {tenant.api_key_env} is not set"
                )
            keys[tenant.name] = value
        elif key_file is not None:
            found = by_tenant.get(tenant.name, [])
            if len(found) != 1:
                how = "no key" if not found else f"{len(found)} keys"
                raise TenantKeyError(f"tenant {tenant.name!r}: the keys file has {how} for it")
            keys[tenant.name] = found[0]
    return keys


def resolve_tenant_keys(workload: Workload, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`tenant_keys` with the workload's keys file read from disk."""
    key_file = None
    if workload.api_keys_file is not None:
        path = Path(workload.api_keys_file)
        try:
            key_file = parse_keys(path.read_text())
        except OSError as exc:
            raise TenantKeyError(f"apiKeysFile {path}: {exc.strerror or exc}") from None
        except KeyFileError as exc:
            raise TenantKeyError(f"apiKeysFile {path}: {exc}") from None
    return tenant_keys(workload, environ, key_file)
