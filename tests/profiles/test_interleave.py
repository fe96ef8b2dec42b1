"""Interleaved timing on synthetic clocks (deterministic): the round-robin order, paired ratios that
survive a load change, and the noise flag."""
from __future__ import annotations

import pytest

from edgeprune.profiles.interleave import NOISE_LIMIT_PCT, NOISY, paired_ratio, round_robin, run_interleaved, spread_pct
from edgeprune.profiles.pruner_cost import node_times
from edgeprune.profiles.sweep import sweep_rows
from edgeprune.profiles.report import sweep_markdown


def test_round_robin_order_rotates_the_first_point():
    assert round_robin(3, 3) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 0), (2, 2), (2, 0), (2, 1)]
    assert round_robin(1, 2) == [(0, 0), (1, 0)]
    order = round_robin(4, 8)
    for r in range(8):                              # every round visits every point exactly once
        assert sorted(p for rr, p in order if rr == r) == [0, 1, 2, 3]


def test_warmup_first_then_rounds_and_samples_in_round_order():
    calls = []

    def point(name):
        def measure():
            calls.append(name)
            return (name, sum(c == name for c in calls))    # the how-many-th call of this point
        return measure

    ticks = []
    samples = run_interleaved([point("a"), point("b"), point("c")], runs=2, warmup=2, progress=lambda: ticks.append(1))
    assert calls == ["a", "a", "b", "b", "c", "c",        # warm-up: each point in turn, untimed
                     "a", "b", "c", "b", "c", "a"]        # round 0 from a, round 1 from b
    assert samples == [[("a", 3), ("a", 4)], [("b", 3), ("b", 4)], [("c", 3), ("c", 4)]]
    assert len(ticks) == 6


class SyntheticMachine:
    """Each call costs the point's true time times the load at that moment (a step function of the call count)."""

    def __init__(self, costs, load):
        self.costs, self.load, self.calls = costs, load, 0

    def measure(self, point):
        def once():
            t = self.costs[point] * self.load(self.calls)
            self.calls += 1
            return t
        return once


def sequential(machine, points, runs):
    """The old way: every run of one point, then the next point."""
    return [[machine.measure(p)() for _ in range(runs)] for p in points]


def test_a_load_change_misleads_sequential_timing_but_not_paired_ratios():
    # the true ratio of the full graph to the pruned one is 2.0; the machine gets 3x busier after 6 calls
    costs = {"full": 100.0, "pruned": 50.0}
    step = lambda calls: 1.0 if calls < 6 else 3.0          # noqa: E731
    seq = sequential(SyntheticMachine(costs, step), ["full", "pruned"], runs=5)
    seq_ratio = (sorted(seq[0])[2]) / (sorted(seq[1])[2])    # medians
    assert seq_ratio == pytest.approx(100 / 150)            # "the pruned graph is slower": wrong

    machine = SyntheticMachine(costs, step)
    inter = run_interleaved([machine.measure("full"), machine.measure("pruned")], runs=5, warmup=1)
    ratio = paired_ratio(inter[0], inter[1])
    # warm-ups take calls 0-1, rounds 0-1 calls 2-5 (quiet), rounds 2-4 calls 6-11 (busy): every round is
    # measured under one load, so every paired ratio is the true one
    assert ratio["median"] == pytest.approx(2.0) and ratio["spread_pct"] == pytest.approx(0.0)
    assert not ratio["noisy"]


def test_a_round_that_straddles_a_load_change_is_flagged_noisy():
    costs = {"full": 100.0, "pruned": 50.0}
    machine = SyntheticMachine(costs, lambda calls: 1.0 if calls < 5 else 2.0)   # changes inside round 1
    inter = run_interleaved([machine.measure("full"), machine.measure("pruned")], runs=3, warmup=1)
    ratio = paired_ratio(inter[0], inter[1])
    # round 1 runs pruned (call 4, quiet) then full (call 5, busy): ratio 4.0 instead of 2.0
    assert sorted([a / b for a, b in zip(*inter)]) == pytest.approx([2.0, 2.0, 4.0])
    assert ratio["median"] == pytest.approx(2.0)
    assert ratio["spread_pct"] == pytest.approx(100.0) and ratio["noisy"]


def test_noise_flag_threshold_and_spread():
    assert spread_pct([90.0, 100.0, 110.0]) == pytest.approx(20.0)
    assert spread_pct([]) is None and spread_pct([0.0, 0.0]) is None
    base = [100.0, 100.0, 100.0]
    just_ok = [50.0, 50.0 * 100 / (100 + NOISE_LIMIT_PCT / 2), 50.0 * 100 / (100 - NOISE_LIMIT_PCT / 2)]
    ok = paired_ratio(base, just_ok)
    assert ok["spread_pct"] == pytest.approx(NOISE_LIMIT_PCT, rel=1e-6) and not ok["noisy"]  # at the limit: ok
    assert paired_ratio(base, [50.0, 45.0, 55.0])["noisy"]                                  # ~20 %: noisy
    with pytest.raises(ValueError, match="same non-zero number of rounds"):
        paired_ratio([1.0, 2.0], [1.0])


def _report(method, keep, prefill, ttft, vision, share=None):
    """A profile report as profiler.profile_bundles returns it, reduced to what sweep_rows reads."""
    from edgeprune.profiles.profiler import pruner_summary, summarize

    nodes = [] if share is None else [{"pruner_s": s * v, "graph_s": v, "inferred_s": 0.0, "pruner_nodes": 5}
                                      for s, v in zip(share, vision)]
    samples = {"prefill": prefill, "ttft": ttft, "vision": vision, "decode": [0.01] * len(prefill)}
    return {"sweep_method": method, "keep": keep, "num_image_tokens": 576, "tokens": {"text_tokens": 40},
            "latency_s": {**{k: summarize(v) for k, v in samples.items()}, "decode_per_token": summarize([0.01])},
            "samples_s": samples, "pruner": pruner_summary(nodes), "memory": {"kv_cache_bytes": 1000 * (keep + 40)}}


def test_sweep_rows_pair_rounds_and_flag_only_the_noisy_point():
    full = _report("full", 576, prefill=[1.0, 2.0, 1.0], ttft=[1.5, 3.0, 1.5], vision=[0.4, 0.8, 0.4])
    # round 1 was twice as slow for everyone: paired ratios are unaffected
    steady = _report("dart", 64, prefill=[0.2, 0.4, 0.2], ttft=[0.6, 1.2, 0.6], vision=[0.4, 0.8, 0.4],
                     share=[0.02, 0.02, 0.02])
    # the load hit this point's prefill in round 2 only
    hit = _report("divprune", 64, prefill=[0.2, 0.4, 0.4], ttft=[0.6, 1.2, 0.8], vision=[0.4, 0.8, 0.4],
                  share=[0.02, 0.021, 0.019])
    rows = {r["method"]: r for r in sweep_rows([full, steady, hit], full)}
    assert rows["dart"]["prefill_speedup"] == pytest.approx(5.0) and rows["dart"]["prefill_speedup_spread_pct"] == 0
    assert rows["dart"]["pruner_overhead_pct"] == pytest.approx(2.0) and not rows["dart"]["noisy"]
    assert rows["dart"]["note"] == "" and rows["full"]["pruner_overhead_pct"] is None
    assert rows["full"]["note"] == "reference" and rows["dart"]["pruner_overhead_range_pct"] == pytest.approx([2, 2])
    assert rows["divprune"]["prefill_speedup"] == pytest.approx(5.0)            # the median round
    assert rows["divprune"]["prefill_speedup_spread_pct"] == pytest.approx(50.0)   # (5 - 2.5) / 5
    assert rows["divprune"]["noisy"] and rows["divprune"]["note"] == NOISY
    text = sweep_markdown(list(rows.values()), {"model": "m", "num_image_tokens": 576, "text_tokens": 40, "runs": 3,
                                                "new_tokens": 2, "load_average": [3.0, 2.0, 1.0]})
    assert text.count(NOISY) == 1 and "| dart | 64 |" in text and "5.00x ±0%" in text
    assert "load average 3.00 / 2.00 / 1.00" in text


def _events(runs):
    """ORT profile events: `runs` is a list of runs, each a list of (node name, microseconds) in execution order."""
    events, ts = [], 0
    for nodes in runs:
        start = ts
        for name, dur in nodes:
            events.append({"cat": "Node", "name": f"{name}_fence_before", "ts": ts, "dur": 0})
            events.append({"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur})
            ts += dur + 1
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": ts - start})
        ts += 100
    events.append({"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 5})
    return events


def test_node_times_attribute_the_pruner_scope_and_its_fused_nodes():
    run = [("/adapter/vision/encoder/layer.0/mlp/fc1/MatMul", 500), ("BiasGelu_token_3", 40),   # encoder's fusion
           ("/pruner/MatMul/MatmulTransposeFusion/", 30), ("LayerNormalization_token_7", 6),      # pruner's fusion
           ("/pruner/TopK", 4), ("/adapter/projector/linear_1/MatMul", 20)]
    times = node_times(_events([run, [(n, 2 * d) for n, d in run]]))
    assert len(times) == 2
    assert times[0] == {"pruner_s": pytest.approx(40e-6), "graph_s": pytest.approx(600e-6),
                        "inferred_s": pytest.approx(6e-6), "pruner_nodes": 3}
    assert times[1]["pruner_s"] == pytest.approx(80e-6) and times[1]["graph_s"] == pytest.approx(1200e-6)
    assert node_times(_events([[("TensorrtExecutionProvider_0", 900)]])) == [
        {"pruner_s": 0.0, "graph_s": pytest.approx(900e-6), "inferred_s": 0.0, "pruner_nodes": 0}]


def test_pruner_noise_follows_its_slowdown_ratio_not_its_relative_share():
    from edgeprune.profiles.profiler import pruner_summary

    def summary(shares):
        return pruner_summary([{"pruner_s": s, "graph_s": 1.0, "inferred_s": 0.0, "pruner_nodes": 3} for s in shares])

    small = summary([0.003, 0.004, 0.005])          # 0.4 % +- 0.1: a 50 % relative spread, a supported claim
    assert small["share"]["spread_pct"] == pytest.approx(50.0) and not small["slowdown"]["noisy"]
    wild = summary([0.01, 0.02, 0.30])              # "2 %" measured anywhere from 1 to 30 %
    assert wild["slowdown"]["noisy"]
    assert not summary([])["available"]
