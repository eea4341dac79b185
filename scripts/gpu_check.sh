#!/usr/bin/env bash
# GPU check (issue 21), at most ~8 minutes on one CUDA GPU: the tests that need CUDA, the 16-mixed path,
# benchmarks/flops.py on CUDA, and 300 meta-steps of configs/omniglot_5way1shot_imaml_gd.yaml with the default
# path; the card's name is printed beside every figure. Runs on the device machine's own python3 (its image
# holds torch, pytorch-lightning, torchmetrics); prepare .gpu/ here first with scripts/gpu_prepare.sh and carry
# it. Results go to $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .gpu/wheels ]; then "$PY" -m pip install -q --no-index --find-links .gpu/wheels 'jsonargparse[signatures]' || true; fi
if [ -f .gpu/omniglot.tar.gz ]; then
  mkdir -p /tmp/omniglot && tar -C /tmp/omniglot -xzf .gpu/omniglot.tar.gz && export IMAML_OMNIGLOT_ROOT=/tmp/omniglot
fi
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
say() { echo "[$CARD] $*" | tee -a "$OUT/gpu_check.txt"; }
say "torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"

# 1. the tests that need CUDA (fp16-mixed GradScaler path, devices), and the engine on CUDA tensors
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_meta.py -k "fp16 or gpu or cuda" 2>&1 | tail -3 | while read -r l; do say "tests: $l"; done
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_cg.py tests/test_implicit.py -k "cuda or device" 2>&1 | tail -1 | while read -r l; do say "tests: $l"; done

# 2. FLOPs and time of one meta-step on CUDA (every path; sgemm measured on the card)
timeout 150 "$PY" benchmarks/flops.py --device cuda --threads 1 --rounds 3 --methods imaml,imaml_lbfgs8,maml1 \
  --chunks "" --out "$OUT/flops_cuda.json" 2>&1 | tee "$OUT/flops_cuda.log" | grep -E "threads|wrote|Error" \
  | while read -r l; do say "flops: $l"; done

# 3. 300 meta-steps of the shipped 5-way 1-shot config on the GPU, the default path, then 16-mixed for 50;
# wall seconds include the chunk-size timing and the validation and test on 200 tasks each
GPU_RUN=gpu_check_$(date +%s)  # its own log folder: a user's runs of the config stay untouched
t0=$(date +%s)
timeout 150 "$PY" train.py fit --config configs/omniglot_5way1shot_imaml_gd.yaml --trainer.accelerator gpu \
  --trainer.devices 1 --trainer.max_steps 300 --trainer.val_check_interval 300 --experiment "$GPU_RUN" --data.val_tasks 200 \
  --data.test_tasks 200 --trainer.enable_progress_bar false --trainer.default_root_dir /tmp/gpu_run 2>&1 \
  | grep -E "task\(s\) at once|acc|error" | while read -r l; do say "fit 300 steps: $l"; done
say "fit 300 steps: wall $(( $(date +%s) - t0 )) s"
cp "lightning_logs/$GPU_RUN/version_0/metrics.csv" "$OUT/fit300_metrics.csv" 2>/dev/null
timeout 60 "$PY" train.py fit --config configs/omniglot_5way1shot_imaml_gd.yaml --trainer.accelerator gpu \
  --trainer.devices 1 --trainer.max_steps 50 --trainer.precision 16-mixed --trainer.limit_val_batches 1 \
  --test_after_fit false --trainer.enable_progress_bar false --trainer.default_root_dir /tmp/gpu_run16 2>&1 \
  | grep -E "task\(s\) at once|skipped|error|Error" | while read -r l; do say "16-mixed: $l"; done
say "done"
