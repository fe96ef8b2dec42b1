#!/usr/bin/env bash
# The main job on the embedded default model (edgeprune-mini): export it unpruned (K = N = 576) and
# pruned to K = 64, answer a question about a real photo with each, and profile both on this device.
# Re-running reuses the bundles (pass FORCE=1 to export again). Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
EP=.venv/bin/edgeprune
OUT=${OUT:-bundles}
METHOD=${METHOD:-divprune}
DEVICE=${DEVICE:-cpu-generic}
force=(); [ "${FORCE:-0}" = 1 ] && force=(--force)
[ -f "$OUT/mini-full/manifest.json" ] && [ "${FORCE:-0}" != 1 ] || $EP export --method "$METHOD" --out "$OUT/mini-full" "${force[@]}"
[ -f "$OUT/mini-k64/manifest.json" ] && [ "${FORCE:-0}" != 1 ] || $EP export --method "$METHOD" --keep 64 --out "$OUT/mini-k64" "${force[@]}"
for b in mini-full mini-k64; do
  echo "== $b"
  $EP run "$OUT/$b" --image examples/chelsea.png --prompt "What animal is this?" --max-new-tokens 24
done
$EP profile "$OUT/mini-full" --device-profile "$DEVICE" --runs 3 --new-tokens 16 -q
$EP profile "$OUT/mini-k64" --reference "$OUT/mini-full" --device-profile "$DEVICE" --runs 3 --new-tokens 16 -q
