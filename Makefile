# make train : set up .venv/ if needed, then train the bundled tiny default with WRPO (CPU: < 1 minute)
# make test  : set up .venv/ if needed, then lint and run the test suite
# make bench : the fused-loss and train-step benchmarks on this machine
# make bench-csrc : the csrc row kernels against the pure-torch rows and the naive path (CPU)
# make sweep : how the fused loss's cost grows in tokens, K (two K = 4 layouts) and V, CPU (< 15 min)
# make fusion-demo : "Does it fuse?" (docs/fusion.md): the WRPO pipeline on toy arithmetic, 3 seeds (QUICK=1: 1 seed, small;
#                    REWARD=graded: the graded reward, 5 seeds, results in benchmarks/results/fusion_demo/graded)
# make zoo   : every causal-LM architecture of transformers in every layout -> docs/models.md (~1 min)
# make gpu-check : on the first CUDA machine, < 8 min: GPU tests, auto self-test, 8B-head benchmark vs peers, sweep
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: train bench bench-csrc bench-gpu gpu-check sweep test lint setup fusion-demo zoo

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/wrpo train --output_dir outputs/wrpo-tiny

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_head_loss.py --reps 7 --out "benchmarks/results/head_loss_{device}.json"
	$(VENV)/bin/python benchmarks/bench_train_step.py --out "benchmarks/results/train_step_{device}.json"

bench-csrc: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_head_loss.py --methods naive-eager,wrpo-torch,wrpo-torch-nocsrc \
		--reps 12 --out "benchmarks/results/head_loss_csrc_{device}.json"

# the tokens x K x V sweep on this machine, with the GEMM-only floor: JSON and plot under benchmarks/results/
sweep: $(STAMP)
	$(VENV)/bin/python benchmarks/sweep.py --out "benchmarks/results/sweep_{device}.json"

# on a CUDA machine: the Llama-3-8B head shape, then the tokens x K x V sweep (V up to 256k)
bench-gpu: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_head_loss.py --device cuda --B 4 --T 1024 --H 4096 --V 128256 \
		--dtype bf16 --out benchmarks/results/head_loss_llama3_8b_cuda.json
	$(VENV)/bin/python benchmarks/sweep.py --device cuda --out "benchmarks/results/sweep_{device}.json"

# one command for a CUDA machine, results under benchmarks/results/ (GPU_CHECK_ARGS=--dry-run: tiny CPU shapes)
gpu-check: $(STAMP)
	$(VENV)/bin/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

fusion-demo: $(STAMP)
	PYTHONPATH=examples $(VENV)/bin/python -m fusion_demo $(if $(QUICK),--quick) $(if $(REWARD),--reward $(REWARD)) $(if $(OUT),--out $(OUT))

# the model-zoo conformance matrix: wrpo/assets/verified_layouts.json (read by the layout plan) + docs/models.md
zoo: $(STAMP)
	PYTHONPATH=tests $(VENV)/bin/python -m zoo

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(VENV)/bin/python -m pytest -q tests
