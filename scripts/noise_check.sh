#!/usr/bin/env bash
# Does the sweep survive a noisy machine? Runs the same interleaved sweep twice on edgeprune-mini —
# once on the machine as it is, once with busy-loop processes beside it — prints both tables, the load
# seen during each, and for every point whether the two runs' ratios agree within the spreads they
# report (their min-max ranges over the rounds overlap). Run from the repository root; the bundles are
# exported once, under $OUT/bundles, and reused.
#   bash scripts/noise_check.sh                                   # divprune, K = 576 and 64, 5 rounds
#   HOGS=2 RUNS=7 METHODS=dart,divprune KEEP=576,128,64 OUT=/tmp/noise bash scripts/noise_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EP=.venv/bin/edgeprune
OUT=${OUT:-reports/noise-check}
HOGS=${HOGS:-2}               # busy loops in the second sweep: one per core of the 2-core development machine
RUNS=${RUNS:-5}
METHODS=${METHODS:-divprune}
KEEP=${KEEP:-576,64}
THREADS=${THREADS:-1}
args=(--model edgeprune-mini --methods "$METHODS" --keep "$KEEP" --runs "$RUNS" --new-tokens 8 --threads "$THREADS"
      --out "$OUT" -q)
mkdir -p "$OUT"

echo "sweep 1 of 2, machine as it is (load before: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
$EP sweep "${args[@]}" > /dev/null
cp "$OUT/sweep.json" "$OUT/as-is.json"
cp "$OUT/sweep.md" "$OUT/as-is.md"

hogs=()
stop_hogs() { for pid in "${hogs[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_hogs EXIT
for _ in $(seq "$HOGS"); do
  bash -c 'while :; do :; done' &
  hogs+=($!)
done
echo "sweep 2 of 2, with $HOGS busy loops (load before: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
$EP sweep "${args[@]}" > /dev/null
stop_hogs
cp "$OUT/sweep.json" "$OUT/hogged.json"
cp "$OUT/sweep.md" "$OUT/hogged.md"

echo "# machine as it is"; cat "$OUT/as-is.md"
echo; echo "# with $HOGS busy loops beside it"; cat "$OUT/hogged.md"
echo
.venv/bin/python - "$OUT/as-is.json" "$OUT/hogged.json" <<'EOF'
import json, sys

quiet, busy = (json.load(open(p)) for p in sys.argv[1:3])
print("load average (1/5/15 min) after timing: as is", quiet["meta"]["load_average"], "| with hogs",
      busy["meta"]["load_average"])
print("| method | K | ratio | as is: median (min-max over rounds) | with hogs | agree within the spreads |")
print("|---|---:|---|---:|---:|---|")
for a, b in zip(quiet["rows"], busy["rows"]):
    if a["keep"] == a["num_image_tokens"]:
        continue
    for col, rng in [(f"{s}_speedup", f"{s}_speedup_range") for s in ("ttft", "prefill", "vision")] + \
                    [("pruner_overhead_pct", "pruner_overhead_range_pct")]:
        if a[col] is None or b[col] is None:
            continue
        (lo_a, hi_a), (lo_b, hi_b) = a[rng], b[rng]
        agree = "yes" if lo_a <= hi_b and lo_b <= hi_a else "NO"
        print(f"| {a['method']} | {a['keep']} | {col} | {a[col]:.3f} ({lo_a:.3f}-{hi_a:.3f}) | "
              f"{b[col]:.3f} ({lo_b:.3f}-{hi_b:.3f}) | {agree} |")
EOF
