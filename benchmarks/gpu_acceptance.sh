#!/usr/bin/env bash
# GPU acceptance: what a GPU machine checks after a change to the GPU path, in one run.
#
#   bash benchmarks/gpu_acceptance.sh DATA_DIR OUT_DIR [RECIPE_MINUTES]
#
# DATA_DIR: the CIFAR-10 image folder (DATA_DIR/train/<class>/*.jpg). Steps, each under its own
# time limit so that a hang costs only its step:
#   1. pytest -m gpu (CUDA training == CPU, bf16/fp16 SIGTERM + --resume auto == uninterrupted,
#      Muon in bf16, the CUDA device loader == the CPU one);
#   2. one-epoch synthetic runs: classification bf16 + device loader, fp16 + CPU loader,
#      bf16 + --compile, captioning bf16;
#   3. benchmarks/loader.py --device cuda (the loader's share of a step, RandAugment on);
#   4. the hybrid GPU recipe (configs/cifar10_gpu_5min_hybrid.yaml) under RECIPE_MINUTES
#      (default 4.5), then its best checkpoint exported to OUT_DIR/hybrid_export.
# OUT_DIR gets summary.log (every step's rc, time and output tail), metrics.jsonl of the recipe.
set -u
data=${1:?usage: gpu_acceptance.sh DATA_DIR OUT_DIR [RECIPE_MINUTES]}
out=${2:?usage: gpu_acceptance.sh DATA_DIR OUT_DIR [RECIPE_MINUTES]}
minutes=${3:-4.5}
mkdir -p "$out"
log="$out/summary.log"
export PYTHONUNBUFFERED=1
work=$(mktemp -d)

step() {  # step NAME SECONDS COMMAND...: run under a limit, log its rc, time and output tail
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name: $*" | tee -a "$log"
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$work/$name.log" 2>&1
    rc=$?
    echo "-- $name: rc=$rc, $((SECONDS - start)) s" | tee -a "$log"
    tail -n 25 "$work/$name.log" >>"$log"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, timm; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"
} 2>&1 | tee -a "$log"

step gpu_tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider -s \
    tests/test_train.py tests/test_optim.py tests/test_gpu_loader.py
small=(--data synthetic --synthetic-train 4096 --synthetic-val 512 --epochs 1 --device cuda)
step classify_bf16_device_loader 90 python3 train.py "${small[@]}" --amp bf16 --loader device \
    --out-dir "$work/r1"
step classify_fp16_cpu_loader 90 python3 train.py "${small[@]}" --amp fp16 --loader cpu \
    --workers 4 --out-dir "$work/r2"
step classify_bf16_compile 150 python3 train.py "${small[@]}" --amp bf16 --loader device \
    --compile --out-dir "$work/r3"
step caption_bf16 120 python3 train.py --task caption --data shapes --model caption_mini_patch8_32 \
    --task-args '{"train_scenes": 2048, "val_scenes": 128}' --epochs 1 --device cuda --amp bf16 \
    --out-dir "$work/r4"
step loader_benchmark 90 python3 benchmarks/loader.py --device cuda
limit=$(python3 -c "print(int(float('$minutes') * 60 + 75))")
step hybrid_recipe "$limit" python3 benchmarks/time_to_accuracy.py \
    --config configs/cifar10_gpu_5min_hybrid.yaml --time-limit "$minutes" --data-dir "$data" \
    --out-dir "$work/hybrid"
cp "$work/hybrid/metrics.jsonl" "$out/" 2>/dev/null
step export 60 python3 -m vit.export --checkpoint "$work/hybrid/best.pt" \
    --out-dir "$out/hybrid_export"
echo "done: $(date -u)" | tee -a "$log"
