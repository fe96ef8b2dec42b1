"""scripts/eval_inllm.py: what a results row keeps (fast; no model)."""
from __future__ import annotations

import json

import pytest

from edgeprune.eval.data import CLASSES
from edgeprune.eval.vlm import EvalResult, _score
from tests.conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("eval_inllm")


def test_a_row_keeps_its_answers_and_rescores_to_its_accuracy(script):
    answers = ["Sneaker.", "a bag", "a white shirt", "Coat"]
    labels = [CLASSES.index("Sneaker"), CLASSES.index("Bag"), CLASSES.index("Shirt"), CLASSES.index("Pullover")]
    result = EvalResult("divprune", 64, 4, _score(answers, labels), 0.5, 1.0, answers=answers)
    config = {"label": "fastv@L2 576->64", "llm": "fastv", "avg": 98.1}
    row = script.result_row(config, result, seconds=2.0, threads=2)
    assert row["answers"] == answers and row["accuracy"] == 0.5 and row["label"] == config["label"]
    assert row["seconds"] == 2.0 and row["threads"] == 2
    back = json.loads(json.dumps(row))   # results.jsonl round trip
    assert script.rescore(back, labels) == row["accuracy"] == 0.5
    assert script.rescore(back, [CLASSES.index("Coat")] * 4) == 0.25   # re-scored against other labels
    with pytest.raises(ValueError, match=r"fastv@L2 576->64: 4 answers for 3 labels"):
        script.rescore(back, labels[:3])


def test_the_eval_set_is_written_once_and_a_different_one_refused(script, tmp_path):
    path = tmp_path / "eval_set.json"
    script.write_eval_set(path, 3, 0, [5, 9, 12], [1, 2, 3])
    assert json.loads(path.read_text()) == {"n": 3, "seed": 0, "indices": [5, 9, 12], "labels": [1, 2, 3]}
    script.write_eval_set(path, 3, 0, [5, 9, 12], [1, 2, 3])   # the same set: a rerun appends to the same rows
    with pytest.raises(SystemExit, match="eval_set.json: another eval set"):
        script.write_eval_set(path, 3, 1, [5, 9, 13], [1, 2, 3])
    assert json.loads(path.read_text())["indices"] == [5, 9, 12]
