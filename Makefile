# The two set-up commands of the README: `make demo` and `make test`. Both install what they need.
PY := .venv/bin/python
RUFF := .venv/bin/ruff
PORT ?= 8188

.PHONY: env test unit lint format demo serve clean

env:
	@bash scripts/bootstrap.sh

test: env
	$(PY) -m pytest tests

unit: env
	$(PY) -m pytest tests/unit

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
	rm -rf .venv .comfyui .cache .serve demo_output test_artifacts
