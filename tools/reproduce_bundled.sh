#!/usr/bin/env bash
# The exact commands that produced the bundled weights, model cards and BENCHMARKS.md.
# Run from the repository root with ../shared beside it, in the environment of the README's test command.
# CPU times on 2 cores: intensity ~2 min, vqvae ~1 h, evaluate ~10 min, bench ~5 min (+ preprocessing cache).
set -euo pipefail
DATA=../shared/data
CACHE=${UAD_CACHE:-$HOME/.cache/uad}

uad train --model intensity --data "$DATA/healthy/ixi_t1" --out runs/intensity --cache "$CACHE" --seed 0
uad train --model vqvae --data "$DATA/healthy/ixi_t1" --out runs/vqvae --cache "$CACHE" --seed 0 \
    --steps 4000 --batch-size 32 --lr 5e-4 --validate-every 500
python tools/bundle_weights.py runs/intensity runs/vqvae --default vqvae
python tools/write_model_cards.py
uad evaluate --data "$DATA" --models vqvae intensity --cache "$CACHE"
uad bench --input "$DATA/healthy/native_head/chris_t1.nii.gz" --models vqvae intensity --runs 3
