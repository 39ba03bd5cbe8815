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

# Defaults of the main jobs (override on the command line: make train RUN=runs/mine ARGS="--lr 3e-4")
# `make train` writes $(RUN)/train/, `make demo` $(RUN)/<timestamp>/; both point $(RUN)/latest at the
# folder they write, and the jobs that read a run (eval, bench, retrain, dataset-info) default to it.
RUN ?= runs/default
TRAIN_DIR ?= $(RUN)/train
ENDPOINT ?= tcp://127.0.0.1:5555
ARCHIVE ?= $(RUN)/latest/archive.hdf5
CKPT ?= $(RUN)/latest/draft_best.pt
DEMOS ?= data/demos/libero_spatial_expert.hdf5
ARGS ?=
# stop with a hint when the demonstrations file is missing (it is not shipped: `make demos` records it)
NEED_DEMOS = @test -f "$(DEMOS)" || { echo "no demonstrations at $(DEMOS): record them with 'make demos', or pass DEMOS=file.hdf5" >&2; exit 2; }

.PHONY: help venv test test-slow lint produce train retrain eval bench bench-gpu bench-7b demos dataset-info \
        train-codec train-vla eval-vla demo clean venv-oft produce-oft

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
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .  # the rsd-* commands
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

dataset-info: venv  ## print a robomimic-style summary of an HDF5 file (FILE=…; default: the latest archive, else DEMOS)
	$(PY) -m producer.dataset_info $(or $(FILE),$(wildcard $(ARCHIVE)),$(DEMOS))

train-codec: venv  ## fit the RFSQ action codec on demo chunks (or FROM_ARCHIVE=a.hdf5 [NORM_STATS=…json])
	$(if $(FROM_ARCHIVE),,$(NEED_DEMOS))
	$(PY) -m trainer.train_codec $(if $(FROM_ARCHIVE),--archives $(FROM_ARCHIVE) $(if $(NORM_STATS),--norm-stats $(NORM_STATS)),--demos $(DEMOS)) $(ARGS)

train-vla: venv  ## behaviour-clone the embedded VLA on demonstrations
	$(NEED_DEMOS)
	$(PY) -m trainer.train_vla --demos $(DEMOS) $(ARGS)

eval-vla: venv  ## closed-loop success rate of the embedded VLA in LIBERO
	$(PY) -m evaluator.rollout $(ARGS)

produce: venv  ## run LIBERO episodes with the VLA and stream samples to the trainer
	$(PY) -m producer.produce --endpoint $(ENDPOINT) $(ARGS)

train: venv  ## receive samples, archive them to HDF5 and train the draft online (into TRAIN_DIR)
	@mkdir -p $(TRAIN_DIR) && ln -sfn "$$(realpath -m --relative-to=$(RUN) $(TRAIN_DIR))" $(RUN)/latest
	$(PY) -m trainer.online --endpoint $(ENDPOINT) --run-dir $(TRAIN_DIR) $(ARGS)

retrain: venv  ## train the draft offline from archives (ARCHIVE=a.hdf5 [b.hdf5 …])
	$(PY) -m trainer.retrain --archives $(ARCHIVE) --run-dir $(RUN)/retrain $(ARGS)

eval: venv  ## benchmark RSD vs baseline decoding: speedup, acceptance, fidelity, success (beside CKPT)
	$(PY) -m evaluator.eval --draft $(CKPT) --out-dir $(dir $(CKPT))eval $(ARGS)

bench: venv  ## CPU latency benchmark of RSD vs baseline on the embedded VLA (beside CKPT)
	$(PY) -m evaluator.eval --draft $(CKPT) --out-dir $(dir $(CKPT))bench --no-closed-loop $(ARGS)

bench-gpu:  ## 7B timing twin on a GPU (run on a CUDA machine; uses the python that has CUDA torch)
	$(PYTHON) -m evaluator.bench_gpu $(ARGS)

bench-7b:  ## OFT-sized 7B chunks with the vision encoder on a GPU; project an eval (ARGS="--eval-json …")
	$(PYTHON) -m evaluator.bench_7b $(ARGS)

demo: venv  ## the main job: produce + train in parallel, then evaluate, then print a summary
	$(PY) -m evaluator.demo --run-dir $(RUN) $(ARGS)

# ---------------------------------------------------------------- OpenVLA-OFT producer environment
# A second environment for the OFT producer only (docs/oft.md): CUDA torch 2.2.0 and OFT's own pins
# (envs/oft-requirements.txt), its transformers fork with bidirectional attention, openvla-oft and
# dlimp. The trainer stays in .venv; none of this enters requirements.lock. Point the three sources at
# local copies with OFT_SRC=/path/openvla-oft TF_FORK_SRC=/path/transformers-openvla-oft
# DLIMP_SRC=/path/dlimp_openvla; OFT_LIBERO=0 skips LIBERO (replaying recorded observations only).
OFT_VENV := .venv-oft
OFT_PY := $(OFT_VENV)/bin/python
OFT_STAMP := $(OFT_VENV)/.rsd-oft-installed
OFT_PYTHON ?= $(firstword $(foreach p,python3.10 python3.11 python3,$(shell $(p) -c 'print("$(p)")' 2>/dev/null)))
OFT_SRC ?= git+https://github.com/moojink/openvla-oft.git@213c5ff8d6e9673885d7e4dd6f2ce73b5d8a45db
TF_FORK_SRC ?= git+https://github.com/moojink/transformers-openvla-oft.git@bc339d9ad707454c0c115970db43c260067c61ab
DLIMP_SRC ?= git+https://github.com/moojink/dlimp_openvla.git@040105d256bd28866cc6620621a3d5f7b6b91b46
OFT_LIBERO ?= 1
OFT_PIP := $(OFT_PY) -m pip install -q --disable-pip-version-check

venv-oft: $(OFT_STAMP)  ## create .venv-oft for the OpenVLA-OFT producer (CUDA torch 2.2, OFT's pins)

$(OFT_STAMP): envs/oft-requirements.txt envs/oft-libero-requirements.txt envs/oft-constraints.txt
	@$(OFT_PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 9) <= v <= (3, 11) else \
	  f"OFT_PYTHON={sys.executable} is Python {v[0]}.{v[1]}; tensorflow 2.15 (an OpenVLA-OFT pin) needs 3.9-3.11: pass OFT_PYTHON=python3.10")'
	@test -x $(OFT_PY) || $(OFT_PYTHON) -m venv $(OFT_VENV)
	$(OFT_PIP) -r envs/oft-requirements.txt
	$(OFT_PIP) --no-deps "$(TF_FORK_SRC)" "$(DLIMP_SRC)" "$(OFT_SRC)"
	$(OFT_PY) -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'rsd-repo.pth').write_text('$(CURDIR)\\n')"
ifeq ($(OFT_LIBERO),1)
	$(OFT_PIP) -c envs/oft-constraints.txt -r envs/oft-libero-requirements.txt
	LIBERO_CONFIG_PATH=$(CURDIR)/$(OFT_VENV)/libero-config $(OFT_PY) -m producer.libero_setup
endif
	$(OFT_PY) -m common.vla.openvla_oft --check-env
	@touch $@

produce-oft: venv-oft  ## stream OpenVLA-OFT samples (GPU) to `make train`; MODEL=hub id or folder
	LIBERO_CONFIG_PATH=$(CURDIR)/$(OFT_VENV)/libero-config $(OFT_PY) -m producer.produce --vla openvla-oft \
	  --model-id $(or $(MODEL),moojink/openvla-7b-oft-finetuned-libero-spatial) --endpoint $(ENDPOINT) $(ARGS)

clean:  ## remove runs/ and caches (keeps .venv and data/)
	rm -rf runs .pytest_cache .ruff_cache
