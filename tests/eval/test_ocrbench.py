"""OCRBench: substring hits, HME100k's space-free case-sensitive rule, binary vs per-answer points, totals."""

from __future__ import annotations

import pytest

from nvlm.eval.scorers import ScoringError, score_items
from nvlm.eval.scorers.ocrbench import CATEGORIES, ocrbench_hits


def _item(pred, refs, kind="Regular Text Recognition", dataset="IIIT5K"):
    return {"prediction": pred, "answers": refs, "type": kind, "dataset_name": dataset}


def test_sample_vectors_both_modes(vectors):
    for case in vectors["ocrbench_sample"]:
        dataset = case.get("dataset_name", "IIIT5K")
        kind = CATEGORIES[-1] if dataset == "HME100k" else CATEGORIES[0]
        item = _item(case["pred"], case["refs"], kind, dataset)
        assert score_items("ocrbench", [item])["items"] == [case["expected"]], case
        assert score_items("ocrbench", [item], mode="nvlm")["items"] == [case["megatron_nvlm"]], case


def test_empty_answer_matches_anything():
    assert ocrbench_hits("whatever", [""], "IIIT5K") == 1


def test_hme_is_case_sensitive_and_space_free_others_lowercase():
    assert ocrbench_hits("X^{2}", ["x^{2}"], "HME100k") == 0
    assert ocrbench_hits("X^{2}", ["x^{2}"], "IIIT5K") == 1
    assert ocrbench_hits("a b", ["ab"], "HME100k") == 1
    assert ocrbench_hits("a b", ["ab"], "IIIT5K") == 0


def test_aggregate_vector(vectors):
    case = vectors["ocrbench_aggregate"][0]
    items = []
    for kind, hits in case["hits"].items():
        items += [_item("yes", ["yes"], kind)] * hits + [_item("no", ["yes"], kind)] * 3
    out = score_items("ocrbench", items)
    assert out["score"] == case["expected"]
    assert out["text_recognition"] == case["text_recognition"]
    assert out["by_category"]["Doc-oriented VQA"] == {"score": 120, "total": 200}
    assert out["by_dataset"]["IIIT5K"]["n"] == len(items)


def test_nvlm_overcounts_in_the_total():
    items = [_item("cats", ["cat", "cats"]), _item("dog", ["dog"])]
    assert score_items("ocrbench", items)["score"] == 2
    assert score_items("ocrbench", items, mode="nvlm")["score"] == 3


def test_unknown_category_and_missing_fields_are_errors():
    with pytest.raises(ScoringError, match="10 OCRBench categories") as err:
        score_items("ocrbench", [_item("a", ["a"]), _item("a", ["a"], kind="Scene Text VQA")])
    assert err.value.index == 1
    with pytest.raises(ScoringError, match='missing field "dataset_name"'):
        score_items("ocrbench", [{"prediction": "a", "answers": ["a"], "type": CATEGORIES[0]}])
