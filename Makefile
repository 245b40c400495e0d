# The two set-up commands of the README: `make demo` and `make test`. Both install what they need.
PY := .venv/bin/python
PORT ?= 8188

.PHONY: env test unit demo serve clean

env:
	@bash scripts/bootstrap.sh

test: env
	$(PY) -m pytest tests

unit: env
	$(PY) -m pytest tests/unit

demo: env
	$(PY) scripts/demo.py

serve: env
	$(PY) scripts/serve.py --port $(PORT)

clean:
	rm -rf .venv .comfyui .cache .serve demo_output test_artifacts
