#!/usr/bin/env bash
# The main job on the embedded default model (edgeprune-mini): export it unpruned (K = N = 576) and
# pruned to K = 64, profile both on this device, interleaved, and print one table (TTFT, prefill
# speedup against the token-count limit, KV cache, pruner cost, and whether the machine was too noisy
# to trust a ratio), then ask the pruned bundle the question the model was aligned for about a
# held-out Fashion-MNIST test image (examples/fashion-mnist/labels.json). Expected answer: Sneaker.
# edgeprune-mini knows only these ten garments: a photo of anything else gets a meaningless answer.
# Re-running reuses the bundles. Run from the repository root.
#   METHOD=dart DEVICE=jetson-orin-nano-8gb OUT=reports/main-job bash examples/main_job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EP=.venv/bin/edgeprune
OUT=${OUT:-reports/main-job}
METHOD=${METHOD:-divprune}
$EP sweep --model edgeprune-mini --methods "$METHOD" --keep 576,64 --runs 3 --new-tokens 16 --out "$OUT"
$EP run "$OUT/bundles/$METHOD-k64" --image examples/fashion-mnist/sneaker.png \
    --prompt "What item of clothing is this?" --max-new-tokens 24
