#!/usr/bin/env bash
# Everything a short GPU loan should check, in one run, most wanted first: the train-step benchmark
# (bf16, then TF32) with MFU against PyTorch timm, the default fit on the GPU, the ports' parity
# with timm computed on the GPU, the embedding benchmark and what embed's full-float32 default
# changes against TF32. Each part has its own time limit, so
# a slow one costs only itself; logs and JSON go to $OUT (default gpu-out).
#
#   bash scripts/gpu_check.sh                        # on a machine with a GPU, jax[cuda] and timm
#   BATCH=8 IMG=64 FIT_ARGS="--epochs 1" bash scripts/gpu_check.sh   # a quick try of the script
#
# Wheels for packages the machine lacks can wait in .whl/ (installed into /tmp/site); wheels in
# .whl/pinned/ are this project's tested versions of packages the machine may have in another
# version, used unless vision-ft then fails to build a model.
set -uo pipefail
OUT=$(realpath -m "${OUT:-gpu-out}")
BATCH=${BATCH:-128}
IMG=${IMG:-224}
FIT_ARGS=${FIT_ARGS:-}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}

part() {  # part NAME SECONDS COMMAND...: run one part under its limit, its output into the log
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s)" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -v "^\s*$" | tail -n 25
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$LOG"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
smoke='import jax, flax, optax, vision_ft
m = vision_ft.create_model("tf_efficientnet_lite0", num_classes=2, img_size=64)
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
if compgen -G ".whl/pinned/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pinned .whl/pinned/*.whl || exit 1
    if PYTHONPATH="/tmp/pinned:$PYTHONPATH" "$PYTHON" -c "$smoke" 2>&1 | tee -a "$LOG"; then
        export PYTHONPATH="/tmp/pinned:$PYTHONPATH"
    else
        echo "the pinned versions failed; trying the machine's own" | tee -a "$LOG"
    fi
fi
{ nvidia-smi -L; "$PYTHON" -c "$smoke" && "$PYTHON" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } 2>&1 | tee -a "$LOG" || exit 1

cd benchmarks || exit 1
part "train step, bf16" 180 "$PYTHON" train_step.py --batch "$BATCH" --img-size "$IMG" --precision bf16 \
    --warmup 3 --steps 10 --rounds 3 --json "$OUT/train_step_bf16.json"
cd .. || exit 1
fit_dir=$(mktemp -d)/fit
# shellcheck disable=SC2086  # FIT_ARGS is a list of options
part "default fit" 130 "$PYTHON" -m vision_ft.cli fit --seed 0 --output "$fit_dir" $FIT_ARGS
cp "$fit_dir/final.json" "$OUT/fit_final.json" 2>/dev/null
cd benchmarks || exit 1
part "train step, tf32" 150 "$PYTHON" train_step.py --batch "$BATCH" --img-size "$IMG" --precision tf32 \
    --warmup 3 --steps 10 --rounds 3 --json "$OUT/train_step_tf32.json"
cd .. || exit 1
# one process at a time, each taking GPU memory as it needs it (a JAX process takes 75% at start)
XLA_PYTHON_CLIENT_PREALLOCATE=false part "parity with timm, on the GPU" 90 "$PYTHON" -m pytest -q -p no:cacheprovider \
    "tests/test_resnet.py::test_resnet_matches_timm[resnet50]" \
    "tests/test_efficientnet.py::test_efficientnet_matches_timm[tf_efficientnet_lite0]" \
    "tests/test_efficientnet.py::test_train_mode_matches_timm" \
    "tests/test_efficientnet.py::test_offline_lite0_matches_timm" \
    "tests/test_vit.py::test_vit_matches_timm[vit_small_patch16_224]" \
    "tests/test_convnext.py::test_convnext_matches_timm[convnext_tiny]"
cd benchmarks || exit 1
part "embedding, bf16" 100 "$PYTHON" embed.py --batch $((2 * BATCH)) --img-size "$IMG" --precision bf16 \
    --warmup 3 --steps 10 --rounds 3 --json "$OUT/embed_bf16.json"
cd .. || exit 1
# what --precision fp32 buys embed on this GPU: its embeddings against TF32's (equal on a CPU)
emb_dir=$(mktemp -d)
compare='import sys, numpy as np
from vision_ft.infer.embeddings import read_embeddings
a, b = (read_embeddings(p).embeddings for p in sys.argv[1:3])
print(f"fp32 vs tf32 embeddings: max abs diff {np.abs(a - b).max():.3g}, "
      f"max relative diff {(np.abs(a - b).max(1) / np.abs(a).max(1)).max():.3g}, over {len(a)} images")'
part "embed precision" 120 bash -c "for p in fp32 tf32; do \"$PYTHON\" -m vision_ft.cli embed --no-progress \
    --model tf_efficientnet_lite0 --data npz:bundled:breastmnist --split val --precision \$p \
    --output $emb_dir/\$p.npz || exit 1; done; \"$PYTHON\" -c '$compare' $emb_dir/fp32.npz $emb_dir/tf32.npz \
    | tee $OUT/embed_precision.txt"
