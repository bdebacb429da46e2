#!/usr/bin/env bash
# The GPU check (issue 11): on a single-GPU machine with PyTorch but without Ray, in about 5-6 minutes (9 at most):
#   1. bench/step_throughput.py --device cuda (ours vs byol-pytorch, ResNet-18 at 32 px and ResNet-50 at 224 px, bf16);
#   2. a real `byol pretrain` with 1 GPU worker (NCCL backend, SyncBatchNorm, bf16 autocast) on synthetic JPEG shards,
#      with augment.device data (all augmentation in Ray Data on CPUs), worker (photometric ops on the GPU) and
#      worker + data.decode=worker (Ray Data only reads bytes; nvJPEG decode, crops and photometric ops on the GPU).
# Usage (project root):  ../shared/tools/device-bundle .devbundle      # Ray (+ pydantic) for a machine without them
#                        pip download byol-pytorch beartype --no-deps -d .whl   # the step benchmark's peer
#                        bench/gpu_check.sh OUTDIR                      # on the GPU machine; results land in OUTDIR
# Results (bench/results_io.py's schema): OUTDIR/step_throughput_cuda.json and OUTDIR/gpu_check.json (the pretraining
# runs, bench/gpu_check_summary.py); copy them to bench/results/step_throughput/ and bench/results/gpu_check/.
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$out" /tmp/site
export PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1 BYOL_RAY_DASHBOARD=0  # the bundle has no dashboard packages
[ -f .devbundle/site.tar.xz ] && tar -xJf .devbundle/site.tar.xz -C /tmp/site
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi; python3 -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__, torch.cuda.get_device_name(0))"; nproc; } > "$out/machine.txt" 2>&1

[ -n "${SKIP_STEP:-}" ] || timeout 170 python3 bench/step_throughput.py --device cuda --steps 20 --warmup 5 --out "$out/step_throughput_cuda.json" > "$out/step.log" 2>&1
echo "step benchmark: rc=$?"; tail -4 "$out/step.log"

python3 bench/synthetic_jpeg.py /tmp/jpeg --images 6000 --size 32 >> "$out/machine.txt" 2>&1 || echo "synthetic data failed"
for stage in data worker decode; do
  device=$stage; decode=data
  [ "$stage" = decode ] && device=worker && decode=worker
  timeout 120 python3 -m pipeline.cli pretrain --config configs/cifar10_resnet18.yaml \
    --set data.path=/tmp/jpeg/shards --set augment.device=$device --set data.decode=$decode --set train.max_steps=120 \
    --set eval.max_train_images=2000 --set eval.max_val_images=600 --set log.every_steps=20 \
    --set checkpoint.every_steps=1000 --set run.storage_path=/tmp/runs --set run.name=gpu-$stage \
    --set tracking.uri=sqlite:////tmp/runs/mlflow.db --json > "$out/pretrain_$stage.txt" 2>&1
  echo "pretrain augment.device=$device data.decode=$decode: rc=$?"; grep -E "\[byol\]|error" "$out/pretrain_$stage.txt" | tail -4
done
python3 bench/gpu_check_summary.py "$out"
