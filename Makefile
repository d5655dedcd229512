# Set-up is idempotent: a stamp file records that the pinned deps are installed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data run test test-slow clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	# torch pinned on the same command line so no resolver step can pick a CUDA build.
	$(BIN)/python -m pip install -qq "torch==2.13.0" -e ".[pipeline,dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP) data

# System packages: the data set, and iproute2 for the tests' network-namespace Ray cluster.
data:
	@missing=""; \
	[ -f $(FMNIST)/train-images-idx3-ubyte.gz ] || missing="$$missing dataset-fashion-mnist"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

run: setup
	$(BIN)/legodnn run

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) .legodnn
