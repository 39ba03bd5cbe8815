# RSD — residual speculative decoding for VLA policies.
# Every target installs what it needs into a project-local virtual environment (.venv) first.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rsd-installed
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl
export LIBERO_CONFIG_PATH ?= $(CURDIR)/.venv/libero-config
export TOKENIZERS_PARALLELISM := false

# Defaults of the main jobs (override on the command line: make train STEPS=…)
RUN ?= runs/default
ENDPOINT ?= tcp://127.0.0.1:5555
ARCHIVE ?= $(RUN)/archive.hdf5
CKPT ?= $(RUN)/draft_best.pt
DEMOS ?= data/demos/libero_spatial_expert.hdf5
ARGS ?=

.PHONY: help venv test test-slow lint produce train retrain eval bench bench-gpu bench-7b demos dataset-info \
        train-codec train-vla eval-vla demo clean

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

venv: $(STAMP)  ## create .venv and install pinned dependencies (idempotent)

# requirements.lock is a complete, resolved set: installing it with --no-deps needs no resolver and
# cannot drift. torchvision (pulled in by robomimic for LIBERO's unused lifelong-learning code) is
# removed afterwards: PyPI's build does not load beside the CPU torch wheel, and RSD never imports it.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements.lock
	$(PY) -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'rsd-repo.pth').write_text('$(CURDIR)\\n')"
	-$(PY) -m pip uninstall -q -y torchvision 2>/dev/null
	$(PY) -m producer.libero_setup
	@touch $@

test: venv  ## run the fast test suite (no full LIBERO episodes)
	$(PY) -m pytest -m "not slow" -q -p no:cacheprovider $(ARGS)

test-slow: venv  ## run the slow tests too (full LIBERO episodes, longer training)
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

lint: venv  ## ruff lint + format check
	$(PY) -m ruff check common producer trainer evaluator tests
	$(PY) -m ruff format --check common producer trainer evaluator tests

demos: venv  ## record scripted-expert demonstrations to HDF5
	$(PY) -m producer.demos --out $(DEMOS) $(ARGS)

dataset-info: venv  ## print a robomimic-style summary of an HDF5 file (FILE=…)
	$(PY) -m producer.dataset_info $(or $(FILE),$(DEMOS))

train-codec: venv  ## fit the RFSQ action codec on demonstration action chunks
	$(PY) -m trainer.train_codec --demos $(DEMOS) $(ARGS)

train-vla: venv  ## behaviour-clone the embedded VLA on demonstrations
	$(PY) -m trainer.train_vla --demos $(DEMOS) $(ARGS)

eval-vla: venv  ## closed-loop success rate of the embedded VLA in LIBERO
	$(PY) -m evaluator.rollout $(ARGS)

produce: venv  ## run LIBERO episodes with the VLA and stream samples to the trainer
	$(PY) -m producer.produce --endpoint $(ENDPOINT) $(ARGS)

train: venv  ## receive samples, archive them to HDF5 and train the draft online
	$(PY) -m trainer.online --endpoint $(ENDPOINT) --run-dir $(RUN) $(ARGS)

retrain: venv  ## train the draft offline from archives (ARCHIVE=a.hdf5 [b.hdf5 …])
	$(PY) -m trainer.retrain --archives $(ARCHIVE) --run-dir $(RUN)/retrain $(ARGS)

eval: venv  ## benchmark RSD vs baseline decoding: speedup, acceptance, fidelity, success
	$(PY) -m evaluator.eval --draft $(CKPT) --out-dir $(RUN)/eval $(ARGS)

bench: venv  ## CPU latency benchmark of RSD vs baseline on the embedded VLA
	$(PY) -m evaluator.eval --draft $(CKPT) --out-dir $(RUN)/bench --no-closed-loop $(ARGS)

bench-gpu:  ## 7B timing twin on a GPU (run on a CUDA machine; uses the python that has CUDA torch)
	$(PYTHON) -m evaluator.bench_gpu $(ARGS)

bench-7b:  ## OFT-sized 7B chunks with the vision encoder on a GPU; project an eval (ARGS="--eval-json …")
	$(PYTHON) -m evaluator.bench_7b $(ARGS)

demo: venv  ## the main job: produce + train in parallel, then evaluate, then print a summary
	$(PY) -m evaluator.demo --run-dir $(RUN) $(ARGS)

clean:  ## remove runs/ and caches (keeps .venv and data/)
	rm -rf runs .pytest_cache .ruff_cache
