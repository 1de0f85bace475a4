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
	# Bytecode is compiled at install, as pip does (uv does not by default): where PYTHONDONTWRITEBYTECODE is set
	# (CI's machines), Python never caches it, and every process (each Ray worker among them) would compile Ray,
	# MLflow, pandas and scikit-learn from source at every import: 7-8 s instead of 2-3 s per `import ray.train`.
	$(PY) -m pip install -q torch==2.13.0 uv
	$(PY) -m uv pip install -q --compile-bytecode --python $(PY) -e '.[dev]' || $(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m jobs.demo

# The project's own modules compiled first (a fraction of a second), for the same reason as at install.
# The slowest tests are listed at the end of every run (docs/test-times.md follows them).
test: install
	$(PY) -m compileall -q raylsm jobs tests
	$(PY) -m pytest --durations=12

# Everything that runs without starting Ray and without a long training (the `ray` and `slow` markers;
# tests/conftest.py marks the Ray fixtures' users too).
test-fast: install
	$(PY) -m compileall -q raylsm jobs tests
	$(PY) -m pytest -m "not ray and not slow"

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts data/synth-demo
