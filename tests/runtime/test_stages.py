"""runtime/stages.py (torch-free): budgets, KV groups and masks of an in-LLM stage (METHODS_INLLM.md §1)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeprune.errors import BundleError, EdgepruneError
from edgeprune.runtime.format import Files, Graph, Keys, optional_keys
from edgeprune.runtime.stages import StagePlan, keep_for_average, layer_average


def plan(policy: str = "faithful") -> StagePlan:
    return StagePlan(method="pdrop", stages=((8, 576, 288), (16, 288, 144), (24, 144, 72)), kv_policy=policy,
                     image_start=3, num_layers=32)


@pytest.mark.parametrize("k,layers,budget,expected", [
    (128, [3, 7, 16], 64, (91, 64, 45)),        # §5.1 LLaVA-1.5-7B, B = 64
    (256, [3, 7, 16], 128, (181, 128, 91)),
    (384, [3, 7, 16], 192, (272, 192, 136)),
    (128, [3], 64, (57,)),                       # §5.3 single-stage fallback: 57 / 115 / 172
    (256, [3], 128, (115,)),
    (384, [3], 192, (172,)),
    (576, [2], 192, (166,)),                     # §1 worked table: 166 / 98 / 30 average 192 / 128 / 64
    (576, [2], 128, (98,)),
    (576, [2], 64, (30,)),
])
def test_counts_for_a_layer_average_reproduce_the_spec_tables(k, layers, budget, expected):
    assert keep_for_average("m", k, 32, layers, budget) == expected


def test_layer_average_of_the_worked_table():
    assert layer_average(576, 32, [(2, 192)]) == 216 and layer_average(576, 32, [(2, 64)]) == 96
    assert layer_average(576, 32, [(8, 288), (16, 144), (24, 72)]) == 270
    assert layer_average(2880, 32, [(2, 320)]) == 480
    assert plan().layer_average == 270


def test_kv_groups_and_per_layer_tokens_follow_the_policy():
    faithful, uniform = plan(), plan("uniform")
    assert faithful.kv_groups == (0, 8, 16, 24) and uniform.kv_groups == (0,)
    per_layer = [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert faithful.image_tokens_per_layer() == per_layer == uniform.image_tokens_per_layer()
    assert faithful.kv_image_tokens_per_layer() == per_layer
    assert uniform.kv_image_tokens_per_layer() == [72] * 32


def test_group_masks_shorten_the_image_span_and_keep_the_text_padding():
    p = StagePlan(method="fastv", stages=((2, 4, 2),), kv_policy="faithful", image_start=1, num_layers=4)
    prefill = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])          # S=1, K=4, M=2 (row 1 padded)
    full, short = p.group_masks(prefill)
    np.testing.assert_array_equal(full, prefill)
    np.testing.assert_array_equal(short, [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    (only,) = StagePlan(**{**p.__dict__, "kv_policy": "uniform"}).group_masks(prefill)
    np.testing.assert_array_equal(only, short)


def manifest_of(p: StagePlan | None, graph: bool = True) -> dict:
    """The stage entries as format.read returns them (every optional key filled) beside a prefill graph."""
    m = {key: json.loads(json.dumps(key.default)) for key in optional_keys()}
    m[Keys.LLM_NUM_LAYERS] = 32
    if p is not None:
        m.update(p.to_manifest())
    if graph:
        m[Keys.LLM_PREFILL_GRAPH] = {Graph.FILE: Files.PREFILL, Graph.INPUTS: {}, Graph.OUTPUTS: {}}
    return m


def test_manifest_round_trip_and_inconsistent_keys():
    p = plan()
    assert StagePlan.from_manifest(manifest_of(p)) == p
    assert StagePlan.from_manifest(manifest_of(None, graph=False)) is None
    with pytest.raises(BundleError, match=r"in-LLM stage incomplete \(llm_stage.method='pdrop', 3 llm_stage.stages, "
                                          r"llm.prefill_graph absent\)"):
        StagePlan.from_manifest(manifest_of(p, graph=False))
    with pytest.raises(BundleError, match=r"in-LLM stage incomplete \(llm_stage.method=None, 0 llm_stage.stages, "
                                          r"llm.prefill_graph present\)"):
        StagePlan.from_manifest(manifest_of(None))
    grown = {**manifest_of(p), Keys.LLM_STAGE_STAGES: [{"layer": 8, "keep_in": 576, "keep_out": 600}]}
    with pytest.raises(BundleError, match="each stage keeping <= what the previous one kept"):
        StagePlan.from_manifest(grown)
    beyond = {**manifest_of(p), Keys.LLM_STAGE_STAGES: [{"layer": 32, "keep_in": 576, "keep_out": 64}]}
    with pytest.raises(BundleError, match="expected layers increasing below 32"):
        StagePlan.from_manifest(beyond)
    with pytest.raises(BundleError, match="kv_policy 'lazy'"):
        StagePlan(method="x", stages=((1, 2, 1),), kv_policy="lazy", image_start=0, num_layers=2)


def test_format_kinds_refuse_malformed_stage_records():
    """format.read checks every key against its Kind, so readers never meet these."""
    stages, groups = Keys.LLM_STAGE_STAGES.kind, Keys.LLM_KV_GROUPS.kind
    assert stages([{"layer": 8, "keep_in": 576, "keep_out": 64}]) and stages([])
    assert not stages([{"layer": 8}]) and not stages([{"layer": 0, "keep_in": 576, "keep_out": 64}])
    assert not stages([{"layer": "8", "keep_in": 576, "keep_out": 64}]) and not stages({"layer": 8})
    assert groups([0]) and groups([0, 8, 16]) and not groups([]) and not groups([2]) and not groups([0, 8, 8])


def test_rows_are_checked_against_the_exported_layout():
    p = StagePlan(method="dart", stages=((2, 576, 64),), kv_policy="uniform", image_start=24, num_layers=30,
                  min_text_tokens=4)
    p.check_rows(24, [13, 4])
    with pytest.raises(EdgepruneError, match=r"dart: row\(s\) \[1\] have \[3\] text token\(s\) after the image, "
                                             r"expected >= 4"):
        p.check_rows(24, [13, 3])
    with pytest.raises(EdgepruneError, match="puts the image after 25 tokens; this bundle's in-LLM stage was exported "
                                             "for 24"):
        p.check_rows(25, [13, 13])
