#!/usr/bin/env bash
# The main job on the embedded default model (edgeprune-mini): export it unpruned (K = N = 576) and
# pruned to K = 64, profile both on this device and print one table (TTFT, prefill speedup against
# the token-count limit, KV cache, pruner overhead), then answer a question about a real photo with
# the pruned bundle. Re-running reuses the bundles. Run from the repository root.
#   METHOD=dart DEVICE=jetson-orin-nano-8gb OUT=reports/main-job bash examples/main_job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EP=.venv/bin/edgeprune
OUT=${OUT:-reports/main-job}
METHOD=${METHOD:-divprune}
$EP sweep --model edgeprune-mini --methods "$METHOD" --keep 576,64 --runs 3 --new-tokens 16 --out "$OUT"
$EP run "$OUT/bundles/$METHOD-k64" --image examples/chelsea.png --prompt "What animal is this?" --max-new-tokens 24
