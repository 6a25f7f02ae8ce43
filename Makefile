# `make demo` and `make test` work on a fresh machine: each sets up .venv first.
# torch==2.13.0 is installed on the same pip command line as the project so that pip takes the
# local CPU wheel instead of resolving a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
SIZE ?= tiny
NUMERICS ?= autocast

.PHONY: install demo test test-fast bench repro ablation lint docs sample clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q '$(TORCH)' -e '.[dev,eval,hf]'
	touch $(STAMP)

demo: install  ## train llama_tiny on the bundled sample corpus (CPU, a few minutes; replaces runs/demo)
	rm -rf runs/demo
	$(PY) train.py trainer.run_dir=runs/demo trainer.max_steps=500

test: install  ## the whole CPU test suite (what CI runs)
	$(PY) -m pytest -q

test-fast: install  ## the unit tier: no subprocess, no second process, no lm-eval (< 2 min)
	$(PY) -m pytest -q -m "not slow"

bench: install  ## CPU benchmarks (~1 h); tables go to bench/RESULTS.md; GPU: bench/gpu_*.sh
	$(PY) -m bench.unigram
	$(PY) -m bench.throughput --models llama_tiny llama_60m
	$(PY) -m bench.throughput --models llama_tiny llama_60m --optims adamw lorenza --precisions fp32 --compile both --steps 3 --section throughput-cpu-compile
	$(PY) -m bench.throughput --models llama_350m --optims adamw lorenza lorenza8bit --precisions fp32 --checkpointing none block --steps 2 --warmup 1 --section throughput-cpu-checkpointing
	$(PY) -m bench.memory loss --tokens 4096 8192 16384
	$(PY) -m bench.ssrf
	$(PY) -m bench.memory states
	$(PY) -m bench.op_count --model llama_60m
	$(PY) -m bench.step_time --models llama_tiny llama_60m
	$(PY) -m bench.step_time --models llama_60m --batch 1 --accum 4 --variants adamw adamw_2fwd lorenza lorenza_zo1
	$(PY) -m bench.ascent_in_forward
	$(PY) -m bench.memory fused --models llama_60m llama_130m
	$(PY) -m bench.data_pipeline
	$(PY) -m bench.memory estimate
	$(PY) -m bench.allreduce_bytes
	$(PY) -m bench.dp_overlap
	$(PY) -m bench.memory plan
	$(PY) -m bench.memory galore
	$(PY) -m bench.memory fsdp --model llama_350m
	$(PY) -m bench.golden --steps 60 --gap 20
	$(PY) -m bench.golden --steps 60 --gap 20 --lr 0 --floor

ablation: install  ## is LORENZA flatter and better? 5 seeds of every method and ablation (CPU, ~1 h; experiments/ablation)
	$(PY) -m experiments.ablation
	$(PY) -m experiments.ablation --regime repeat --names adamw-lr1e-3 adamw-lr3e-3 galore lorenza lorenza_plus adazo_sam sam

repro: install  ## the paper's table: SIZE=tiny (CPU, ~25 min, 3 seeds) or 60m/130m/350m/1b (GPU, C4); NUMERICS=galore: baselines in pure bf16 (experiments/repro)
	$(PY) -m experiments.repro --size $(SIZE) --numerics $(NUMERICS)

lint: install  ## ruff, and the import contracts of pyproject.toml (tests never import bench...)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

docs: install  ## build the documentation site (offline) into site/; --strict: a broken link fails
	$(VENV)/bin/mkdocs build --strict --site-dir site

sample: install  ## rebuild data/sample from Debian's python3.11-doc (byte-identical)
	$(PY) -m data.sample_corpus

clean:
	rm -rf $(VENV) runs outputs site .pytest_cache
