"""`edgeprune sweep` on the tiny preset: every file, stable keys, and pruning shortens TTFT."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from edgeprune.cli import main


def test_sweep_tiny_preset(tmp_path, capsys):
    out = tmp_path / "sweep"
    image = tmp_path / "image.png"   # already at the model's size: no resize time in the TTFT
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8)).save(image)
    assert main(["sweep", "--model", "tiny-llava", "--methods", "attention,dart", "--keep", "576,64",
                 "--runs", "2", "--new-tokens", "2", "--threads", "1", "--image", str(image), "--out", str(out),
                 "--llm-methods", "fastv", "--llm-keeps", "64", "--llm-layer", "1"]) == 0
    for name in ("sweep.json", "sweep.md", "sweep.png", "pruner_overhead.png"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "sweep.json").read_text())
    assert result["meta"]["num_image_tokens"] == 576 and result["meta"]["keeps"] == [576, 64]
    rows = {(r["method"], r["keep"]): r for r in result["rows"]}
    assert set(rows) == {("attention", 576), ("attention", 64), ("dart", 576), ("dart", 64), ("fastv (in-LLM)", 576),
                         ("fastv (in-LLM)", 64)}
    # the in-LLM point: layer 0 sees all 576 tokens, layer 1 the 64 kept (uniform policy: both caches hold 64)
    stage, full = rows["fastv (in-LLM)", 64], rows["dart", 576]
    assert stage["layer_average"] == (576 + 64) / 2 and stage["kv_bytes"] == rows["dart", 64]["kv_bytes"]
    assert 1.0 < stage["speedup_predicted"] < rows["dart", 64]["speedup_predicted"]
    assert full["speedup_predicted"] == 1.0
    for method in ("attention", "dart"):
        full, pruned = rows[method, 576], rows[method, 64]
        # times are reported, never compared here: on a shared machine a timed assertion is noise
        # (speed lives in the benchmarks); what is checked is that each was measured
        for row in (full, pruned):
            assert row["ttft_min_ms"] > 0 and row["prefill_min_ms"] > 0, (method, row)
        assert pruned["kv_bytes"] < full["kv_bytes"] and full["kv_ratio"] == 1.0
        m = result["meta"]["text_tokens"]
        assert pruned["token_limit"] == (576 + m) / (64 + m)
        assert pruned["pruner_overhead_pct"] is not None and full["pruner_overhead_pct"] is None
    # the LLM graphs were exported once and reused by every other bundle
    bundles = sorted(p.name for p in (out / "bundles").iterdir())
    assert bundles == ["attention-k64", "dart-k64", "full-k576", "llm-fastv-k64"]
    assert "| attention | 64 |" in capsys.readouterr().out
    # a second sweep reuses the bundles (their manifests match); --cfg goes to the methods that take it
    # (dart takes no scorer: its bundle is reused) and the random-scorer baseline is labelled as such
    mtimes = {name: (out / "bundles" / name / "manifest.json").stat().st_mtime_ns for name in bundles}
    assert main(["sweep", "--model", "tiny-llava", "--methods", "dart,autoselect", "--cfg", "scorer=random",
                 "--keep", "64", "--runs", "1", "--new-tokens", "1", "--threads", "1", "--out", str(out)]) == 0
    assert mtimes == {name: (out / "bundles" / name / "manifest.json").stat().st_mtime_ns for name in bundles}
    assert (out / "bundles" / "autoselect-scorer-random-k64").is_dir()
    result = json.loads((out / "sweep.json").read_text())
    assert {(r["method"], r["keep"]) for r in result["rows"]} == {
        ("dart", 64), ("dart", 576), ("autoselect (untrained)", 64), ("autoselect (untrained)", 576)}
    assert "| autoselect (untrained) | 64 |" in capsys.readouterr().out
    assert main(["sweep", "--model", "tiny-llava", "--methods", "dart", "--cfg", "scorer=random", "--keep", "64",
                 "--out", str(out)]) == 1
    assert "--cfg scorer: none of the methods dart takes this option" in capsys.readouterr().err
