# Two commands on a fresh machine:  make demo   and   make test
# Both create/update .venv and install what they need. As root, the DICOM peers used by
# the tests (dcmtk, dicom3tools, Orthanc), the checkers of deploy/ (shellcheck,
# systemd-analyze) and headless Chromium (the web page's browser tests) come from Debian
# via apt-get; otherwise the tests that need them skip
# and say how to install them.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# PyTorch first, pinned (override for another platform, e.g. TORCH="torch==2.9.1 torchvision==0.24.1").
TORCH  ?= torch==2.14.1 torchvision==0.29.1
SAM2   ?= sam2==1.1.0
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all install system-deps demo test lint bench clean

all: test

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH)
	# sam2 compiles an optional CUDA extension; the pure-PyTorch path is used without it.
	SAM2_BUILD_CUDA=0 $(PIP) install --quiet --no-build-isolation $(SAM2)
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	@missing=""; \
	command -v storescp >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v Orthanc  >/dev/null || missing="$$missing orthanc"; \
	command -v ojph_compress >/dev/null || missing="$$missing openjph-tools"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
			|| echo "warning: apt-get install$$missing failed; tests needing them will skip"; \
	else \
		echo "note: missing Debian packages:$$missing (sudo apt-get install$$missing); tests needing them will skip"; \
	fi

demo: install system-deps
	$(VENV)/bin/dicom-node demo

# Guardrails: lint, formatting and the layering contracts of DESIGN.md (pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: install system-deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install system-deps
	$(PY) benchmarks/receive.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
