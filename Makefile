# Set-up is idempotent: a stamp file records that the pinned deps are installed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data run test test-slow clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned on the same command line so no resolver step can pick a CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0" -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP) data

data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

run: setup
	$(BIN)/legodnn run

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) .legodnn
