# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test install lint bench clean arm-lane browser fuzz

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is pinned and installed first: an unpinned resolve pulls several GB of CUDA wheels.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/depthfold demo --out out/demo

# The aarch64 emulation lane (tests/backends/test_tvm_aarch64.py) needs qemu-user-static, the aarch64 cross
# toolchain and an arm64 Python root cached under ~/.cache/depthfold; the script is idempotent (quick when done).
# DEPTHFOLD_ARM_LANE=0 skips both the setup and the lane.
arm-lane: $(STAMP)
	bash scripts/setup_arm_lane.sh $(PY)

# Headless Chromium for the report screenshot test (DEPTHFOLD_BROWSER=0 skips it).
browser:
	bash scripts/setup_browser.sh

test: $(STAMP) arm-lane browser
	$(PY) -m pytest -q -ra

# Differential fuzzing on random models (tests/fuzz), random seeds: 2,000 CNNs through the exact passes, and
# 200 per test of CNN trunks, transformer stacks and the approximate passes; make test runs a fixed slice.
# DEPTHFOLD_FUZZ_EXAMPLES=N sets the count.
fuzz: $(STAMP)
	DEPTHFOLD_FUZZ_EXAMPLES=$${DEPTHFOLD_FUZZ_EXAMPLES:-2000} DEPTHFOLD_FUZZ_RANDOM=1 \
		$(PY) -m pytest -q tests/fuzz --hypothesis-show-statistics

lint: $(STAMP)
	$(VENV)/bin/ruff check depthfold tests benchmarks

# The benchmark plan on this machine: out/bench/<device-id>/report.{json,md,html} (resumes; --force re-measures);
# with an NVIDIA GPU, a second report for its CUDA lanes.
bench: $(STAMP)
	$(VENV)/bin/depthfold bench --out out/bench
	if command -v nvidia-smi >/dev/null; then $(VENV)/bin/depthfold bench --device cuda --out out/bench; fi

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
