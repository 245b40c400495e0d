# The two set-up commands of the README: `make demo` and `make test`. Both install what they need.
PY := .venv/bin/python
RUFF := .venv/bin/ruff
PORT ?= 8188
# The current ComfyUI of the version matrix (make test-current): an upstream source tarball and
# the newest torch with a matching torchaudio on the registry (0.33 imports torchaudio at start).
CURRENT_TARBALL ?= ../shared/comfyui/ComfyUI-0.33.0.tar.gz
CURRENT_TORCH := torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0

.PHONY: env test unit check test-current lint format demo serve clean

env:
	@bash scripts/bootstrap.sh

test: env
	$(PY) -m pytest tests

unit: env
	$(PY) -m pytest tests/unit

# Before a commit: the lint gate and the fast tier, tests/unit (tensors, and ComfyUI's modules
# where a unit needs them; no server, no browser), in about a minute.
check: lint
	$(PY) -m pytest tests/unit -q

# The whole suite again on the current ComfyUI, in its own .venv-current and .comfyui-current.
test-current:
	@test -f "$(CURRENT_TARBALL)" || { echo "test-current: no $(CURRENT_TARBALL); set CURRENT_TARBALL to a ComfyUI source tarball"; exit 1; }
	VENV=.venv-current COMFYUI_DIR=.comfyui-current COMFYUI_TARBALL="$(CURRENT_TARBALL)" \
		TORCH_PINS="$(CURRENT_TORCH)" bash scripts/bootstrap.sh
	COMFYUI_PATH="$(CURDIR)/.comfyui-current" .venv-current/bin/python -m pytest tests

lint: env
	$(RUFF) check .
	$(RUFF) format --check .

format: env
	$(RUFF) check --fix .
	$(RUFF) format .

demo: env
	$(PY) scripts/demo.py

serve: env
	$(PY) scripts/serve.py --port $(PORT)

clean:
	rm -rf .venv .comfyui .venv-current .comfyui-current .cache .serve demo_output test_artifacts
