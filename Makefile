# The README's commands: `make demo` (main job end to end), `make test` (everything) and `make test-fast` (no Ray).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Ray 2.60 turns token auth on once ~/.ray/auth_token exists; pin it for a loopback-only local cluster.
export RAY_AUTH_MODE ?= disabled

.PHONY: install demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first (pinned; pip takes it from the machine's own copy); a GPU machine installs its
	# CUDA build of a torch in the project's range instead. uv installs the rest (same versions as pip, ~10x faster);
	# it keeps the torch already there, which satisfies the project's range. Where uv cannot reach the index
	# (it reads none of pip's settings), pip installs the rest instead.
	$(PY) -m pip install -q torch==2.13.0 uv
	$(PY) -m uv pip install -q --python $(PY) -e '.[dev]' || $(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m jobs.demo

test: install
	$(PY) -m pytest

# Everything that runs without starting Ray and without a long training (the `ray` and `slow` markers;
# tests/conftest.py marks the Ray fixtures' users too).
test-fast: install
	$(PY) -m pytest -m "not ray and not slow"

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts data/synth-demo
