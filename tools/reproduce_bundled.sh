#!/usr/bin/env bash
# The commands that produced the bundled weights, model cards, demo picture and BENCHMARKS.md.
# Run from the repository root with ../shared beside it, in the environment of the README's test command.
# 2-core CPU, no GPU (times when run one at a time): preprocessing cache ~20 min once, intensity ~1 min,
# vqvae ~25 min, rae ~40 min, swin-mae ~45 min, vqvae-transformer ~20 min, mae-classifier ~15 min,
# evaluate ~1.5 h for all models (results cached per model), bench ~10 min.
# Each checkpoint also records the exact command that made it (see Resources/MODEL_CARDS.md).
set -euo pipefail
DATA=../shared/data
CACHE=${UAD_CACHE:-$HOME/.cache/uad}

uad train --model intensity --data "$DATA/healthy/ixi_t1" --out runs/intensity --cache "$CACHE" --seed 0
uad train --model vqvae --data "$DATA/healthy/ixi_t1" --out runs/vqvae --cache "$CACHE" --seed 0 \
    --steps 4000 --batch-size 32 --lr 5e-4 --validate-every 500 --option 'channels=[16,32,64,64]'
uad train --model rae --data "$DATA/healthy/ixi_t1" --out runs/rae --cache "$CACHE" --seed 0 \
    --steps 2500 --batch-size 32 --lr 5e-4 --validate-every 500
uad train --model swin-mae --data "$DATA/healthy/ixi_t1" --out runs/swin-mae --cache "$CACHE" --seed 0 \
    --steps 2000 --batch-size 16 --lr 5e-4 --validate-every 500
# Two-stage models start from the first stage's bundled weights (copied and frozen).
uad train --model vqvae-transformer --init-from runs/vqvae/model.pt --data "$DATA/healthy/ixi_t1" \
    --out runs/vqvae-transformer --cache "$CACHE" --seed 0 --steps 2000 --batch-size 32 --lr 5e-4 --validate-every 500
uad train --model mae-classifier --init-from runs/swin-mae/model.pt --data "$DATA/healthy/ixi_t1" \
    --out runs/mae-classifier --cache "$CACHE" --seed 0 --steps 600 --batch-size 16 --lr 5e-4 --validate-every 600
python tools/bundle_weights.py runs/intensity runs/vqvae runs/rae runs/swin-mae runs/vqvae-transformer \
    runs/mae-classifier --default rae
MODELS="intensity vqvae vqvae-transformer rae swin-mae mae-classifier"
uad evaluate --data "$DATA" --models $MODELS --cache "$CACHE" --mask-sizes 64  # both sizes: drop --mask-sizes (+25 min)
python tools/write_model_cards.py
uad bench --input "$DATA/healthy/native_head/chris_t1.nii.gz" --models $MODELS --runs 1
uad demo --out /tmp/uad-demo && cp /tmp/uad-demo/overview.png Resources/demo-overview.png
