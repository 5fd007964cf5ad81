# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv, install rrstub (building native/ with cffi) and build
# the example kernels first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: all setup kernels linux packages demo test bench doctor clean

all: setup

setup: $(STAMP) kernels linux packages

$(STAMP): pyproject.toml setup.py native/build.py native/rrnative.c native/rrnative.h
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

kernels:
	$(MAKE) --no-print-directory -C examples

# gdb and chromium (apt-get as root; otherwise the command to run is printed).
packages:
	bash tools/setup-packages.sh

# Debian's cloud kernel and busybox-static (apt-get as root), and the example initramfs.
linux:
	bash examples/linux/setup.sh

demo: setup
	bash examples/demo.sh

test: setup
	$(VENV)/bin/python -m pytest

bench: setup
	$(VENV)/bin/python benchmarks/vmm_bench.py
	@echo
	$(VENV)/bin/python benchmarks/record_bench.py
	@echo
	$(VENV)/bin/python benchmarks/gdb_bench.py
	@echo
	$(VENV)/bin/python benchmarks/workflow_bench.py
	@echo
	$(VENV)/bin/python benchmarks/stops_bench.py
	@echo
	$(VENV)/bin/python benchmarks/debug_bench.py
	@echo
	$(VENV)/bin/python benchmarks/linux_bench.py
	@echo
	$(VENV)/bin/python benchmarks/ui_bench.py
	@echo
	$(VENV)/bin/python benchmarks/index_bench.py

doctor: setup
	$(VENV)/bin/rrstub doctor

clean:
	$(MAKE) --no-print-directory -C examples clean
	rm -rf $(VENV) build *.egg-info vmm/_native*.so vmm/_native.c
