"""The task suite (examples/tasks), its checks, and `protege eval` on a model folder in process
(against an HTTP endpoint: `tests/integration/test_eval_endpoint.py`)."""

import importlib.util
from pathlib import Path

import pytest

from distill.evaluate import DEFAULT_SUITE, evaluate
from distill.gate.checks import Expect, check_answer
from distill.tasks import load_suite, score, summary

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "examples" / "tasks"
FAMILIES = {"classify", "extract", "qa", "format", "summarize", "structured"}


def _generator():
    spec = importlib.util.spec_from_file_location("tasks_generate", TASKS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _user(case) -> str:
    return case.messages[-1]["content"]


# --- the suite --------------------------------------------------------------------------------


def test_the_files_are_what_the_generator_writes():
    gen = _generator()
    splits = gen.generate()
    assert (TASKS / "suite.jsonl").read_text() == gen.render(splits["dev"] + splits["gate"])
    assert (TASKS / "pool.jsonl").read_text() == gen.render(splits["train"])


def test_suite_size_splits_and_families():
    cases = load_suite(DEFAULT_SUITE)
    assert len(cases) >= 400
    for split in ("dev", "gate"):
        part = [c for c in cases if c.split == split]
        assert {c.family for c in part} == FAMILIES
        assert min(sum(c.family == f for c in part) for f in FAMILIES) >= 20
    structured = [c for c in cases if c.family == "structured"]
    assert {c.kind for c in structured} == {"json_schema", "tool_required", "tool_auto"}
    assert all(c.conditions() != (None, None) for c in structured)
    assert {c.split for c in load_suite(TASKS / "pool.jsonl")} == {"train"}


@pytest.mark.parametrize("path", [DEFAULT_SUITE, TASKS / "pool.jsonl"])
def test_every_reference_passes_its_own_check(path):
    failing = [(c.id, why) for c in load_suite(path)
               for ok, why in [check_answer(c.reference, c.check)] if not ok]
    assert failing == []


def test_no_prompt_and_no_fact_in_two_splits():
    cases = load_suite(DEFAULT_SUITE) + load_suite(TASKS / "pool.jsonl")
    by_split = {s: {_user(c) for c in cases if c.split == s} for s in ("dev", "gate", "train")}
    assert not by_split["gate"] & (by_split["dev"] | by_split["train"])
    assert not by_split["dev"] & by_split["train"]

    def facts(split):  # the question without its answer-format instruction
        return {_user(c).rsplit("?", 1)[0] for c in cases
                if c.split == split and c.kind in ("capital", "science")}

    gate, dev, train = facts("gate"), facts("dev"), facts("train")
    assert gate and dev and train
    assert not gate & (dev | train) and not dev & train


def test_a_wrong_answer_fails_each_kind_of_check():
    cases = load_suite(DEFAULT_SUITE, splits=["gate"])
    kinds = {}
    for c in cases:
        kinds.setdefault(c.check.kind, c)
    assert set(kinds) >= {"label", "json_fields", "aliases", "regex", "json_schema", "contains"}
    for case in kinds.values():
        assert not check_answer("I am not sure what you mean.", case.check)[0], case.id


# --- the new checks ---------------------------------------------------------------------------


def test_aliases_match_whole_words_only():
    e = Expect(kind="aliases", value=["Canberra"])
    assert check_answer("The capital of Australia is Canberra.", e)[0]
    assert not check_answer("Canberraville", e)[0]
    n = Expect(kind="aliases", value=["8", "eight"])
    assert check_answer("There are eight planets.", n)[0]
    assert not check_answer("There are 18 planets.", n)[0]
    assert check_answer("12,000", Expect(kind="aliases", value=["12,000"]))[0]


def test_json_fields_compare_each_field_normalised():
    e = Expect(kind="json_fields", fields={"name": "Ann Berg", "quantity": 12})
    assert check_answer('{"name": "ann berg", "quantity": "12", "extra": 1}', e)[0]
    assert check_answer('```json\n{"name": "Ann Berg", "quantity": 12}\n```', e)[0]
    ok, why = check_answer('{"name": "Ann"}', e)
    assert not ok and "name" in why
    ok, why = check_answer('{"name": "Ann Berg"}', e)
    assert not ok and why == "no field 'quantity'"
    assert check_answer("[1, 2]", e) == (False, "not a JSON object")
    with pytest.raises(ValueError, match="needs `fields`"):
        Expect(kind="json_fields")


def test_word_bounds_apply_to_any_kind():
    e = Expect(kind="contains", value=["Oslo"], max_words=5, min_words=2)
    assert check_answer("Meeting in Oslo today.", e)[0]
    assert check_answer("Oslo", e) == (False, "1 words, fewer than 2")
    assert check_answer("We will all meet in Oslo next week.", e) == (False,
                                                                       "8 words, more than 5")


# --- loading and scoring ----------------------------------------------------------------------


def test_load_suite_errors_name_the_line(tmp_path):
    good = (TASKS / "suite.jsonl").read_text().splitlines()[0]
    path = tmp_path / "s.jsonl"
    path.write_text(good + "\n" + good + "\n")
    with pytest.raises(ValueError, match="line 2: id .* repeats"):
        load_suite(path)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        load_suite(path)
    path.write_text(good.replace('"label"', '"nonsense"', 1) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        load_suite(path)
    with pytest.raises(ValueError, match="no case of split gate"):
        load_suite(TASKS / "pool.jsonl", splits=["gate"])
    with pytest.raises(ValueError, match="cannot|No such"):
        load_suite(tmp_path / "missing.jsonl")


def test_limit_spreads_per_family():
    cases = load_suite(DEFAULT_SUITE, splits=["dev"], limit=3)
    assert len(cases) == 3 * len(FAMILIES)
    assert all(sum(c.family == f for c in cases) == 3 for f in FAMILIES)


def test_summary_rates_and_wilson_intervals():
    cases = load_suite(DEFAULT_SUITE, splits=["gate"], families=["qa", "format"])
    answers = [c.reference if c.family == "qa" else "no" for c in cases]
    s = summary(score(cases, answers))
    qa, fmt = s["families"]["qa"], s["families"]["format"]
    assert qa["rate"] == 1.0 and qa["low"] < 1.0 and qa["high"] == pytest.approx(1.0)
    assert fmt["rate"] == 0.0 and fmt["low"] == 0.0 and 0 < fmt["high"] < 0.1
    assert s["overall"]["passed"] == qa["n"] and s["overall"]["n"] == len(cases)
    assert s["overall"]["low"] < 0.5 < s["overall"]["high"]


def test_eval_runs_a_model_folder_in_process(tmp_path):
    from tests.unit.test_student_init import tiny_llama, word_tokenizer

    folder = tmp_path / "tiny"
    tiny_llama(layers=2, seed=3).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    cases = load_suite(DEFAULT_SUITE, splits=["dev"], families=["qa", "classify"], limit=2)
    report = evaluate(str(folder), cases)
    assert report["model"] == str(folder) and report["cases"] == 4
    assert all(r["completion_tokens"] > 0 and r["latency_s"] > 0 for r in report["rows"])
    assert [r["passed"] for r in report["rows"]] == [
        check_answer(r["answer"], c.check)[0] for r, c in zip(report["rows"], cases)]
