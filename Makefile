# Two commands for a newcomer: `make demo` and `make test`.
# --no-compile: pip skips byte-compiling every installed module (jax, tensorstore, matplotlib, ...); Python
# compiles the few a run imports on first import instead (install 31 s -> 17 s on a 2-core machine, 2026-12-07).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile -e ".[dev]"
	touch $(STAMP)

.PHONY: install demo test test-fast clean
install: $(STAMP)

# Train the tiny demo model on the embedded corpus (CPU), evaluate at loops 1..2·mean, plot.
demo: $(STAMP)
	$(BIN)/parcae demo --workdir runs/demo

# The whole suite (CI runs this through .ci/run). One xdist worker per core of the 2-core CI machine: the
# suite's time is XLA compilation, and a third worker made every compile slower (997 s with 3, 693 s with 2,
# same machine and commit, 2026-12-07).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=15

# Everything but tests marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow"

clean:
	rm -rf runs/demo
