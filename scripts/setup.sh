#!/usr/bin/env bash
# Installs whatever is missing for this project: system packages (redis-server, prometheus), a virtual
# environment with the CPU or GPU Python stack and the development tools (requirements/dev.txt), and the project
# itself in editable mode.
# Idempotent: a stamp file records what was installed, so a second run does nothing.
#   AVATAR_STACK=cpu|gpu   force a stack (default: gpu when nvidia-smi sees a GPU, else cpu)
#   VENV=path              where the virtual environment lives (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

stack=${AVATAR_STACK:-}
if [ -z "$stack" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then stack=gpu; else stack=cpu; fi
fi
case "$stack" in cpu|gpu) ;; *) echo "AVATAR_STACK must be cpu or gpu, got '$stack'" >&2; exit 2;; esac

# --- system packages ---------------------------------------------------------------------------------
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[setup] apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  # prometheus' Debian package would start a system service; policy-rc.d keeps it (and redis) stopped.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# --- python environment ------------------------------------------------------------------------------
stamp="$VENV/.avatar-installed"
want="$stack $(cat requirements/common.txt requirements/$stack.txt requirements/dev.txt scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
echo "[setup] installing the $stack stack (a few minutes on a fresh machine)"
$PIP install -q -r requirements/$stack.txt -r requirements/common.txt -r requirements/dev.txt
if [ "$stack" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec link CUDA libraries and break transformers and vLLM beside the
  # CPU torch; triton is useless without a GPU. The processor builds video patches without torchvision.
  $PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
$PIP install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "[setup] done ($stack stack in $VENV)"
