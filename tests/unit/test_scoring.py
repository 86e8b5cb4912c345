"""shadow.scoring: each score's properties, small hand-computed values, and the combined score."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shadow.scoring import (
    ScoreWeights,
    canonical_json,
    combine,
    cosine,
    edit_similarity,
    exact_match,
    extract_label,
    field_agreement,
    format_scores,
    json_agreement,
    json_equal,
    label_agreement,
    lcs_length,
    length_ratio,
    levenshtein,
    normalize,
    parse_json,
    rouge_l,
    score_pair,
    words,
)

TEXT = st.text(max_size=40)
WORDY = st.lists(
    st.sampled_from(
        ["the", "a", "cat", "sat", "on", "mat", "Red,", "red", "blue.", "42", "-5", "é"]
    ),
    max_size=15,
).map(" ".join)
PAIRWISE = [exact_match, edit_similarity, rouge_l, length_ratio]


# --- normalisation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('  "Paris."  ', "paris"),
        ("PARIS!", "paris"),
        ("«Paris»", "paris"),
        ("`yes`", "yes"),
        ("**Paris**", "paris"),
        ("(B)", "b"),
        ("hello \t\n  world", "hello world"),
        ("U.S.A.", "u.s.a"),  # inner punctuation stays
        ("-5", "-5"),  # meaningful at an edge: kept
        ("5%.", "5%"),
        ("#1", "#1"),
        ("Straße", "strasse"),  # casefold, not lower
        ("ﬁle", "file"),  # NFKC: ligature
        ("Ｐａｒｉｓ", "paris"),  # NFKC: full width
        ("a\u00a0b", "a b"),  # no-break space is whitespace after NFKC
        ("", ""),
        (" ...!? ", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


@given(TEXT)
def test_normalize_is_idempotent(text):
    assert normalize(normalize(text)) == normalize(text)


def test_words_drop_punctuation():
    assert words("The cat, the HAT!") == ["the", "cat", "the", "hat"]
    assert words(" ... ") == []


def test_exact_match():
    assert exact_match("Paris", " paris. ") == 1.0
    assert exact_match("Paris", "Lyon") == 0.0
    assert exact_match("-5", "5") == 0.0
    assert exact_match("", "") == 1.0


# --- properties shared by the pairwise similarities ----------------------------------------


@pytest.mark.parametrize("score", PAIRWISE, ids=lambda f: f.__name__)
@settings(max_examples=60, deadline=None)
@given(a=TEXT | WORDY, b=TEXT | WORDY)
def test_bounded_and_symmetric(score, a, b):
    value = score(a, b)
    assert 0.0 <= value <= 1.0
    assert value == score(b, a)


@pytest.mark.parametrize("score", PAIRWISE, ids=lambda f: f.__name__)
@settings(max_examples=60, deadline=None)
@given(a=TEXT | WORDY)
def test_identity_is_full_similarity(score, a):
    assert score(a, a) == 1.0


# --- edit similarity -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3),
     ("abc", "abc", 0), ("ab", "ba", 2), ("intention", "execution", 5), ("aaab", "aab", 1)],
)  # fmt: skip
def test_levenshtein_known_values(a, b, distance):
    assert levenshtein(a, b) == distance


def _levenshtein_reference(a: str, b: str) -> int:
    """Full-matrix DP, no shortcuts."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(
                d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            )
    return d[-1][-1]


@settings(max_examples=200, deadline=None)
@given(a=st.text("abc", max_size=12), b=st.text("abc", max_size=12), c=st.text("abc", max_size=12))
def test_levenshtein_matches_reference_and_is_a_metric(a, b, c):
    assert levenshtein(a, b) == _levenshtein_reference(a, b)
    assert levenshtein(a, c) <= levenshtein(a, b) + levenshtein(b, c)


def test_edit_similarity_known_values():
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("Kitten!", "  sitting") == pytest.approx(1 - 3 / 7)  # normalised
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("", "abc") == 0.0


def test_edit_similarity_compares_only_the_first_characters():
    a, b = "x" * 50 + "a" * 50, "x" * 50 + "b" * 50
    assert edit_similarity(a, b, max_chars=50) == 1.0
    assert edit_similarity(a, b, max_chars=100) == 0.5


# --- ROUGE-L ---------------------------------------------------------------------------------


def test_lcs_length_known_values():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (CLRS)
    assert lcs_length([], ["a"]) == 0
    assert lcs_length("abc", "abc") == 3


def test_rouge_l_known_values():
    # LCS "the cat on the mat" = 5 of 6 + 6 tokens: F1 = 2*5 / 12.
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(10 / 12)
    assert rouge_l("a b c d", "d c b a") == pytest.approx(2 / 8)  # LCS 1
    assert rouge_l("a b", "a b c d") == pytest.approx(4 / 6)  # P 1, R 1/2: F1 2/3
    assert rouge_l("", "") == 1.0
    assert rouge_l("!!", "...") == 1.0  # no word tokens in either
    assert rouge_l("word", "") == 0.0


def test_rouge_l_compares_only_the_first_tokens():
    a, b = "same " * 10 + "x " * 10, "same " * 10 + "y " * 10
    assert rouge_l(a, b, max_tokens=10) == 1.0
    assert rouge_l(a, b, max_tokens=20) == 0.5


# --- length ratio ----------------------------------------------------------------------------


def test_length_ratio():
    assert length_ratio("one two", "one two three four") == 0.5
    assert length_ratio("", "") == 1.0
    assert length_ratio("", "word") == 0.0
    assert length_ratio("a, b, c!", "x y z") == 1.0  # punctuation is not a token


# --- JSON ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a": 1}', {"a": 1}),
        ("  [1, 2]\n", [1, 2]),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('Here it is:\n```JSON\n{"a": 1}\n```\nDone.', {"a": 1}),
        ("```\n[true]\n```", [True]),
        ('```python\nx = 1\n```\nthen\n```json\n{"b": 2}\n```', {"b": 2}),  # first JSON fence
    ],
)
def test_parse_json_valid(text, value):
    assert parse_json(text) == (True, value)


@pytest.mark.parametrize(
    "text",
    ["Paris", "42", '"a string"', "null", "{'a': 1}", '{"a": 1', "", "```python\n{}\n```",
     "[" * 100_000],
)  # fmt: skip
def test_parse_json_invalid(text):
    assert parse_json(text) == (False, None)  # scalars are answers, not structured output


def test_canonical_json():
    assert canonical_json({"b": 1, "a": [1.0, 2.5]}) == '{"a":[1,2.5],"b":1}'
    assert canonical_json({"a": True}) != canonical_json({"a": 1})


def test_json_agreement():
    assert json_agreement('{"a": 1}', '```json\n{"b": 2}\n```') == 1.0
    assert json_agreement('{"a": 1}', "sorry, I cannot") == 0.0
    assert json_agreement("sorry, I cannot", '{"a": 1}') == 0.0
    assert json_agreement("Paris", "Lyon") is None  # not a JSON pair: the score drops out


def test_json_equal():
    assert json_equal('{"a": 1, "b": [1, 2]}', '```json\n{ "b": [1, 2.0], "a": 1 }\n```') == 1.0
    assert json_equal('{"a": 1}', '{"a": 2}') == 0.0
    assert json_equal('{"a": [1, 2]}', '{"a": [2, 1]}') == 0.0  # arrays are ordered
    assert json_equal('{"a": true}', '{"a": 1}') == 0.0
    assert json_equal('{"a": 1}', "no JSON") is None
    assert json_equal("no", "JSON") is None


# --- labels ----------------------------------------------------------------------------------

LABELS = ("positive", "negative", "neutral")


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Positive", "positive"),
        ("The sentiment is NEGATIVE.", "negative"),
        ("neutral, maybe positive", "neutral"),  # the first one in the text
        ("It is non-negative", "negative"),  # "-" is not a word character
        ("positively", None),  # whole words only
        ("no idea", None),
        ("", None),
    ],
)
def test_extract_label(text, label):
    assert extract_label(text, LABELS) == label


def test_extract_label_prefers_the_longest_label_and_returns_it_as_configured():
    labels = ["spam", "Not Spam"]
    assert extract_label("This is not  spam.", labels) == "Not Spam"
    assert extract_label("spam, not spam", labels) == "spam"
    assert extract_label("C++ code", ["c++", "c"]) == "c++"


def test_label_agreement():
    assert label_agreement("Positive.", "I'd say positive", LABELS) == 1.0
    assert label_agreement("positive", "negative", LABELS) == 0.0
    assert label_agreement("positive", "I cannot tell", LABELS) == 0.0
    assert label_agreement("I cannot tell", "no idea", LABELS) is None  # nothing to agree on
    assert label_agreement("positive", "positive", ()) is None  # not a classification route


# --- cosine ----------------------------------------------------------------------------------

VECTORS = st.lists(st.floats(-100, 100, allow_nan=False), min_size=3, max_size=3).filter(
    lambda v: math.sqrt(sum(x * x for x in v)) > 1e-3
)


@given(VECTORS, VECTORS)
def test_cosine_bounded_symmetric_and_one_for_itself(u, v):
    assert -1.0 <= cosine(u, v) <= 1.0
    assert cosine(u, v) == pytest.approx(cosine(v, u))
    assert cosine(u, u) == pytest.approx(1.0)


def test_cosine_known_values_and_errors():
    assert cosine([1, 0], [0, 1]) == 0.0
    assert cosine([1, 0], [-2, 0]) == -1.0
    assert cosine([1, 1], [1, 0]) == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError, match="equal length"):
        cosine([1, 0], [1, 0, 0])
    with pytest.raises(ValueError, match="zero vector"):
        cosine([0, 0], [1, 0])


# --- weights and the combined score ----------------------------------------------------------


def only(**weights: float) -> ScoreWeights:
    """These weights, every other one 0."""
    return ScoreWeights(**dict.fromkeys(ScoreWeights.model_fields, 0.0) | weights)


def test_combine_is_one_minus_the_weighted_mean_of_available_scores():
    weights = only(edit_similarity=1, rouge_l=3)
    assert combine({"edit_similarity": 1.0, "rouge_l": 0.0}, weights) == pytest.approx(0.75)
    # None or missing scores drop out and the remaining weights renormalise.
    assert combine({"edit_similarity": 0.5, "rouge_l": None}, weights) == pytest.approx(0.5)
    assert combine({"edit_similarity": 0.5, "disagreement": 0.9}, weights) == pytest.approx(0.5)


def test_combine_bounds():
    everything = dict.fromkeys(ScoreWeights.model_fields, 1.0)
    assert combine(everything) == 0.0
    assert combine(dict.fromkeys(ScoreWeights.model_fields, 0.0)) == 1.0


def test_combine_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"rouge_l=1\.5 is outside \[0, 1\]"):
        combine({"rouge_l": 1.5})
    with pytest.raises(ValueError, match="outside"):
        combine({"rouge_l": float("nan")})
    with pytest.raises(ValueError, match="no score with a positive weight is available"):
        combine({"rouge_l": 1.0, "semantic": None}, only(semantic=1))


def test_score_weights_validation():
    with pytest.raises(ValidationError, match="rouge_l"):
        ScoreWeights(rouge_l=-1)
    with pytest.raises(ValidationError, match="semantic"):
        ScoreWeights(semantic=float("inf"))
    with pytest.raises(ValidationError, match="at least one score weight must be positive"):
        only()
    with pytest.raises(ValidationError, match="rougel"):
        ScoreWeights(rougel=1)  # a typo is an error, not a silently ignored field
    with pytest.raises(ValidationError, match="frozen"):
        ScoreWeights().rouge_l = 2  # type: ignore[misc]


@settings(max_examples=40, deadline=None)
@given(
    scores=st.fixed_dictionaries(
        {name: st.none() | st.floats(0, 1) for name in ScoreWeights.model_fields}
    ).filter(lambda s: any(v is not None for v in s.values())),
    raw=st.lists(st.floats(0.01, 10), min_size=len(ScoreWeights.model_fields),
                 max_size=len(ScoreWeights.model_fields)),
)  # fmt: skip
def test_combine_is_bounded_and_scale_free(scores, raw):
    weights = ScoreWeights(**dict(zip(ScoreWeights.model_fields, raw, strict=True)))
    doubled = ScoreWeights(**{k: 2 * w for k, w in weights.model_dump().items()})
    value = combine(scores, weights)
    assert 0.0 <= value <= 1.0
    assert combine(scores, doubled) == pytest.approx(value)


# --- score_pair ------------------------------------------------------------------------------

STRUCTURED = ("format_agreement", "field_agreement_normalized")  # with a response format only
KEYS = [*(k for k in ScoreWeights.model_fields if k not in STRUCTURED), "disagreement"]


def fake_embed(texts):
    """Bag of letters: enough to tell embeddings apart without a model."""
    return [[t.lower().count(c) + 1e-3 for c in "abcdefghijklmnopqrstuvwxyz"] for t in texts]


@settings(max_examples=40, deadline=None)
@given(TEXT | WORDY)
def test_score_pair_identical_answers_do_not_disagree(text):
    scores = score_pair(text, text, labels=LABELS, embed=fake_embed)
    assert list(scores) == KEYS
    assert scores["disagreement"] == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(TEXT | WORDY, TEXT | WORDY)
def test_score_pair_is_bounded_and_symmetric(a, b):
    scores = score_pair(a, b, labels=LABELS, embed=fake_embed)
    assert all(v is None or 0.0 <= v <= 1.0 for v in scores.values())
    assert scores == pytest.approx(score_pair(b, a, labels=LABELS, embed=fake_embed))


def test_score_pair_example():
    scores = score_pair("The answer is positive.", "positive")
    assert scores["exact_match"] == 0.0
    assert scores["rouge_l"] == pytest.approx(2 * 1 / (4 + 1))
    assert scores["length_ratio"] == pytest.approx(1 / 4)
    assert scores["semantic"] is None and scores["label_agreement"] is None
    assert scores["json_agreement"] is None and scores["json_equal"] is None
    assert scores["disagreement"] == pytest.approx(combine(scores))
    with_labels = score_pair("The answer is positive.", "positive", labels=LABELS)
    assert with_labels["label_agreement"] == 1.0
    assert with_labels["disagreement"] < scores["disagreement"]  # the label weighs most


def test_score_pair_semantic_and_embed_errors():
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return [[1.0, 0.0], [-1.0, 0.0]]

    assert score_pair("student", "teacher", embed=embed)["semantic"] == 0.0  # negative cosine
    assert calls == [["student", "teacher"]]
    with pytest.raises(ValueError, match="embed returned 1 vectors for 2 texts"):
        score_pair("a", "b", embed=lambda texts: [[1.0]])


def test_field_agreement_exact_and_normalized():
    a = '{"person": "Yara Kowalski", "day": "Friday", "city": "Bergen"}'
    b = '{"person": "yara kowalski", "day": "Friday", "room": 4}'
    assert field_agreement(a, b) == pytest.approx(1 / 4)  # keys: person, day, city, room
    assert field_agreement(a, b, normalized=True) == pytest.approx(2 / 4)
    assert field_agreement(a, a) == 1.0 and field_agreement("{}", "{}") == 1.0
    assert field_agreement('{"n": 1}', '{"n": 1.0}') == 1.0
    assert field_agreement(a, "[1]") is None and field_agreement(a, "not json") is None


def test_format_scores_and_their_place_in_disagreement():
    def conforms(text):
        return text.startswith("{")

    good, bad = '{"a": 1, "b": "x"}', "a is 1"
    both = format_scores(good, '{"a": 1, "b": "X"}', conforms)
    assert both == {"student_format_valid": 1.0, "teacher_format_valid": 1.0,
                    "format_agreement": 1.0, "field_agreement": 0.5,
                    "field_agreement_normalized": 1.0}
    one = format_scores(bad, good, conforms)
    assert (one["student_format_valid"], one["format_agreement"]) == (0.0, 0.0)
    assert one["field_agreement"] is None
    assert format_scores(bad, bad, conforms)["format_agreement"] is None
    plain = score_pair(good, good)
    assert "format_agreement" not in plain
    scored = score_pair(bad, good, conforms=conforms)
    assert scored["format_agreement"] == 0.0
    assert scored["disagreement"] > score_pair(bad, good)["disagreement"]  # it weighs in
