# identity-grpo: every target runs inside .venv, which `install` creates from requirements.txt.
# `make test` and `make demo` install first when needed, so they work on a fresh machine.

PY      := .venv/bin/python
STAMP   := .venv/.installed
CONFIG  ?= cluster_configs/local_cpu.yaml
ARGS    ?=
NPROC   ?= 1
OUT     ?= outputs
export PYTHONUNBUFFERED := 1
# A crash in native code (a segfault at exit, issue #14) prints every thread's Python stack, in tests and in CI.
export PYTHONFAULTHANDLER := 1

.PHONY: install test test-slow test-slurm test-rehearsal test-faults test-tools rehearse demo shards train-reward reward-data study-reward-data study-grpo-design train eval doctor export-lora bench lint tensorboard submit clean

install: $(STAMP)

# Idempotent: reruns only when the pins change. torch goes first and alone, by exact version, so nothing later
# pulls another build: where pip's sources offer the CPU wheel (CI's machines) it takes that one, on a CUDA machine
# PyPI's CUDA build; a 2.13.0 already installed (say from the PyTorch index for another CUDA) is kept.
$(STAMP): requirements.txt setup.cfg
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$$(grep -E '^torch==' requirements.txt)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	$(PY) -m runtime.distributed
	touch $(STAMP)

# The unit and component tests (minutes). The integration suites below start Ray clusters, DeepSpeed engines,
# Slurm and real-width models; CI runs them all (.ci/run, two at a time: most of their phases use one core).
test: install
	$(PY) -m pytest -q -m "not slow and not slurm and not rehearsal and not faults and not tools" tests

# The whole system on CPU: distributed loop, resume, fault recovery (hooks), async, broadcast, EMA, demo, cluster launch.
test-slow: install
	$(PY) -m pytest -q -m "slow and not slurm and not rehearsal and not faults and not tools" tests

test-slurm: install
	$(PY) -m pytest -q -m slurm tests

# Every preset at real widths, reduced depth, on CPU (tests/test_rehearsal.py; minutes each; run in CI).
test-rehearsal: install
	$(PY) -m pytest -q -m rehearsal tests

# The preference-data tools end to end: candidates on Ray rollout workers, `make reward-data`'s pipeline (minutes).
test-tools: install
	$(PY) -m pytest -q -m tools tests

# Worker processes kill -9'ed from outside at chosen moments of a run (tests/process_killer.py; minutes; run in CI).
test-faults: install
	$(PY) -m pytest -q -m faults tests

# Rehearse a GPU preset on this CPU: its real architectures, random weights, tiny sizes (launcher/rehearse.py).
PRESET ?= cluster_configs/vace_1.3b_8gpu.yaml
rehearse: install
	$(PY) -m launcher.rehearse --config $(PRESET) $(ARGS)

DEMO_CONFIG ?= cluster_configs/demo_cpu.yaml
demo: install
	$(PY) -m launcher.demo --config $(DEMO_CONFIG) $(ARGS)

shards: install
	$(PY) -m data.demo --out $(OUT)/demo_data

REWARD_CONFIG ?= cluster_configs/reward_local_cpu.yaml
# NPROC ranks on this machine (one per GPU), through torchrun, the launch cluster_configs/slurm/train_reward.sbatch
# runs on every node: make train-reward REWARD_CONFIG=cluster_configs/reward_3b_8gpu.yaml NPROC=8
train-reward: install
	test -e $(OUT)/demo_data/pairs-000000.tar || $(PY) -m data.demo --out $(OUT)/demo_data
	$(PY) -m torch.distributed.run --standalone --nproc-per-node=$(NPROC) -m reward.train --config $(REWARD_CONFIG) $(ARGS)

# Preference data on the demo (candidates, auto labels, labels through the page, synthetic pairs), then the reward
# model as the paper trains it, three seeds, its accuracy on human test pairs with the interval over seeds.
reward-data: install
	$(PY) -m launcher.study reward-data --arms mixed_teacher --out $(OUT)/reward_data $(ARGS)

# The paper's studies (launcher/study.py): every arm x seed, resumable, a table with intervals over seeds.
study-reward-data: install
	$(PY) -m launcher.study reward-data --out $(OUT)/studies/reward_data $(ARGS)

study-grpo-design: install
	$(PY) -m launcher.study grpo-design --out $(OUT)/studies/grpo_design $(ARGS)

train: install
	$(PY) -m launcher.train --config $(CONFIG) $(ARGS)

# Evaluate a run's policies; WORKERS=8: across a node's 8 GPUs (Ray evaluation workers), 0: in this process.
WORKERS ?= 0
eval: install
	$(PY) -m launcher.evaluate --config $(CONFIG) --num-workers $(WORKERS) $(ARGS)

# Check a preset on this node (weights, data, output, resume, GPUs) without starting anything; print its plan.
doctor: install
	$(PY) -m launcher.doctor --config $(CONFIG) $(ARGS)

# A run's LoRA for stock diffusers, with a model card: make export-lora RUN=outputs/vace_1.3b EXPORT=exports/vace_1.3b
RUN    ?= $(OUT)/demo
EXPORT ?= exports/$(notdir $(RUN))
export-lora: install
	$(PY) -m launcher.export $(RUN) --out $(EXPORT) $(ARGS)

BENCHES := bench/loop_overhead.py bench/data_throughput.py bench/gpu_wan.py bench/layout_seconds.py \
           bench/annotate_load.py
bench: install
	for b in $(BENCHES); do $(PY) $$b || exit 1; done

# ruff, then the rooms' import contract (setup.cfg [importlinter]: layers, no circles; README "Layout").
lint: install
	$(PY) -m ruff check config runtime data policy reward evaluation workers prefdata launcher tests bench
	.venv/bin/lint-imports

# Submit to a running Ray cluster: make submit ADDRESS=http://head:8265 CONFIG=... ARGS="..."
# (= ray job submit --working-dir . --runtime-env cluster_configs/runtime_env.yaml, waiting up to
# AGENT_TIMEOUT_S for a fresh head's job agent, then following the job's log: launcher/submit.py)
ADDRESS ?= http://127.0.0.1:8265
AGENT_TIMEOUT_S ?= 180
submit: install
	$(PY) -m launcher.submit --address $(ADDRESS) --agent-timeout-s $(AGENT_TIMEOUT_S) \
		-- python -m launcher.train --config $(CONFIG) $(ARGS)

tensorboard: install
	.venv/bin/tensorboard --logdir $(OUT) --bind_all

clean:
	rm -rf outputs .pytest_cache
