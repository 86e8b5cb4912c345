"""Disagreement scores for one (student answer, teacher answer) pair: pure functions over text.

Owns the similarity scores and the combined `disagreement`; does not own the embedding model
(`shadow.embedder`, handed in as `embed`), when scoring runs (the scoring worker, never on a
user's request path) or where scores are stored. No I/O, clock, env or randomness here.

Every score is a *similarity* in [0, 1] (1 = the answers agree), or None when it does not apply
to the pair; `combine` turns the available ones into `disagreement` = 1 - their weighted mean.

| key               | similarity                                          | None when             |
|-------------------|-----------------------------------------------------|-----------------------|
| `exact_match`     | 1 / 0: equal after `normalize`                      |                       |
| `edit_similarity` | 1 - Levenshtein / longer length (first 1000 chars)  |                       |
| `rouge_l`         | ROUGE-L F1 over word tokens (first 500 tokens)      |                       |
| `length_ratio`    | shorter / longer, in word tokens                    |                       |
| `json_agreement`  | 1: both answers are JSON, 0: only one is            | neither is JSON       |
| `json_equal`      | 1 / 0: equal JSON values after canonicalising       | not both JSON         |
| `label_agreement` | 1 / 0: both answers name the same label first       | no labels, or neither |
|                   |                                                     | answer names one      |
| `semantic`        | cosine of the two embeddings, negatives as 0        | no `embed` given      |
| `format_agreement`| 1: both answers conform to the request's            | no response_format,   |
|                   | response_format, 0: only one does                   | or neither conforms   |
| `field_agreement` | share of top-level keys (of either answer) whose    | no response_format,   |
|                   | values are equal JSON                               | or not both objects   |
| `field_agreement_normalized` | the same, strings compared after         | as above              |
|                   | `normalize` (case, spacing, edge punctuation)       |                       |
| `tool_name_agreement` | share of calls (of the answer with more) that   | neither answer calls  |
|                   | the other answer also makes to the same function    | a tool                |
| `tool_args_agreement` | the same, with equal arguments too (canonical   | as above              |
|                   | JSON)                                               |                       |

With a response format, `student_format_valid` and `teacher_format_valid` (1 / 0) say which
answers conform: facts beside the scores, not similarities, so `combine` leaves them out (as it
does the exact `field_agreement`; its normalised form carries the weight).

*Word tokens* are the runs of Unicode word characters (`\\w+`) of the normalised text:
punctuation is not a token. *JSON* means an object or an array (bare scalars such as `42` are
answers, not structured output), either the whole answer or the first fenced ```` ```json ````
(or bare ```` ``` ````) block in it. (Over 400 lines: the table above and one small pure
function a score.)
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rapidfuzz.distance import LCSseq, Levenshtein

from serving.engines.structured import split_calls

MAX_EDIT_CHARS = 1000  # edit similarity compares the first N characters: a bounded cost
MAX_ROUGE_TOKENS = 500  # ROUGE-L compares the first N word tokens
_KEEP_AT_EDGES = frozenset("-%#@&")  # punctuation that changes meaning at an edge: "-5", "5%"
_WORD = re.compile(r"\w+")
_FENCE = re.compile(r"```([^`\n]*)\n(.*?)```", re.DOTALL)  # info string, then the body

Vector = Sequence[float]
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Embed = Callable[[list[str]], Sequence[Vector]]


# --- text ----------------------------------------------------------------------------------------


def _strippable(c: str) -> bool:
    if c.isspace() or c == "`":
        return True
    return unicodedata.category(c).startswith("P") and c not in _KEEP_AT_EDGES


def normalize(text: str) -> str:
    """NFKC, casefolded, whitespace runs collapsed to one space, surrounding punctuation removed.

    Removed at both ends: whitespace, backticks and Unicode punctuation (quotes, brackets,
    `.,;:!?…*`) except `- % # @ &`, which change meaning there ("-5", "5%").
    `' "Paris."  '` → `paris`; inner punctuation stays: `"U.S.A."` → `u.s.a`.
    """
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    text = " ".join(text.split())
    start, end = 0, len(text)
    while start < end and _strippable(text[start]):
        start += 1
    while end > start and _strippable(text[end - 1]):
        end -= 1
    return text[start:end]


def words(text: str) -> list[str]:
    """The word tokens of `normalize(text)`: runs of Unicode word characters."""
    return _WORD.findall(normalize(text))


# --- string similarities -------------------------------------------------------------------------


def exact_match(a: str, b: str) -> float:
    """1.0 when the answers are equal after `normalize`, else 0.0."""
    return 1.0 if normalize(a) == normalize(b) else 0.0


def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Insertions, deletions and substitutions turning `a` into `b` (rapidfuzz's bit-parallel
    Levenshtein: strings or sequences of hashable items)."""
    return Levenshtein.distance(a, b)


def edit_similarity(a: str, b: str, max_chars: int = MAX_EDIT_CHARS) -> float:
    """1 - Levenshtein distance / the longer length, over the first `max_chars` characters of
    each normalised answer; 1.0 when both are empty."""
    a, b = normalize(a)[:max_chars], normalize(b)[:max_chars]
    longest = max(len(a), len(b))
    return 1.0 - levenshtein(a, b) / longest if longest else 1.0


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of `a` and `b` (rapidfuzz's bit-parallel LCS)."""
    return LCSseq.similarity(a, b)


def rouge_l(a: str, b: str, max_tokens: int = MAX_ROUGE_TOKENS) -> float:
    """ROUGE-L F1 over the first `max_tokens` word tokens of each answer; 1.0 when both have none.

    With precision LCS/len(a) and recall LCS/len(b), F1 is 2·LCS / (len(a) + len(b)): symmetric,
    so it does not matter which answer is the reference.
    """
    ta, tb = words(a)[:max_tokens], words(b)[:max_tokens]
    if not ta and not tb:
        return 1.0
    return 2 * lcs_length(ta, tb) / (len(ta) + len(tb))


def length_ratio(a: str, b: str) -> float:
    """Word tokens of the shorter answer / of the longer one; 1.0 when both have none."""
    na, nb = len(words(a)), len(words(b))
    return min(na, nb) / max(na, nb) if max(na, nb) else 1.0


# --- JSON ----------------------------------------------------------------------------------------


def parse_json(text: str) -> tuple[bool, Any]:
    """`(True, value)` when the answer is a JSON object or array, else `(False, None)`.

    The answer is the first fenced ```` ```json ```` or ```` ``` ```` block when it has one,
    else the whole text; surrounding whitespace is ignored.
    """
    fences = (
        m.group(2) for m in _FENCE.finditer(text) if m.group(1).strip().lower() in ("", "json")
    )
    try:
        value = json.loads(next(fences, text))
    except (ValueError, RecursionError):  # not JSON, a number too long, nesting too deep
        return False, None
    return (True, value) if isinstance(value, dict | list) else (False, None)


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # 1.0 and 1 are the same JSON number
    return value


def canonical_json(value: Any) -> str:
    """One string per JSON value: keys sorted, no spaces, integral floats written as integers."""
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_agreement(a: str, b: str) -> float | None:
    """JSON-validity agreement: 1.0 when both answers are JSON, 0.0 when exactly one is,
    None when neither is (the pair is not about JSON, so the score does not apply)."""
    va, vb = parse_json(a)[0], parse_json(b)[0]
    if not va and not vb:
        return None
    return 1.0 if va and vb else 0.0


def json_equal(a: str, b: str) -> float | None:
    """1.0 when both answers are JSON with equal canonical forms, 0.0 when both are JSON but
    differ, None unless both are JSON (`json_agreement` scores that case)."""
    (va, xa), (vb, xb) = parse_json(a), parse_json(b)
    if not (va and vb):
        return None
    return 1.0 if canonical_json(xa) == canonical_json(xb) else 0.0


def _object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def field_agreement(a: str, b: str, normalized: bool = False) -> float | None:
    """Share of the keys of either JSON object whose values are equal (canonical JSON; with
    `normalized`, strings compared after `normalize`); None unless both answers are objects."""
    xa, xb = _object(a), _object(b)
    if xa is None or xb is None:
        return None
    keys = set(xa) | set(xb)
    if not keys:
        return 1.0

    def same(u: Any, v: Any) -> bool:
        if normalized and isinstance(u, str) and isinstance(v, str):
            return normalize(u) == normalize(v)
        return canonical_json(u) == canonical_json(v)

    return sum(k in xa and k in xb and same(xa[k], xb[k]) for k in keys) / len(keys)


def format_scores(student: str, teacher: str, conforms: Callable[[str], bool]
                  ) -> dict[str, float | None]:
    """The structured-output scores of a pair whose request had a response format;
    `conforms(text)` says whether an answer matches that format."""
    sv, tv = conforms(student), conforms(teacher)
    return {
        "student_format_valid": float(sv),
        "teacher_format_valid": float(tv),
        "format_agreement": None if not (sv or tv) else float(sv and tv),
        "field_agreement": field_agreement(student, teacher),
        "field_agreement_normalized": field_agreement(student, teacher, normalized=True),
    }


def _calls(text: str) -> list[tuple[str, str]]:
    """An answer's tool calls as (name, canonical arguments), sorted; unreadable ones skipped."""
    out = []
    for call in split_calls(text)[1]:
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            out.append((call["name"], canonical_json(call.get("arguments"))))
    return sorted(out)


def tool_scores(student: str, teacher: str) -> dict[str, float | None]:
    """How far two answers make the same tool calls, in any order: the share of the calls (of
    the answer with more) matched one to one by function name, and by name and arguments.
    Both None when neither answer calls a tool."""
    a, b = _calls(student), _calls(teacher)
    if not a and not b:
        return {"tool_name_agreement": None, "tool_args_agreement": None}

    def matched(x: list, y: list) -> int:
        left = list(y)
        hits = 0
        for item in x:
            if item in left:
                left.remove(item)
                hits += 1
        return hits

    most = max(len(a), len(b))
    return {"tool_name_agreement": matched([n for n, _ in a], [n for n, _ in b]) / most,
            "tool_args_agreement": matched(a, b) / most}


# --- labels --------------------------------------------------------------------------------------


def extract_label(text: str, labels: Sequence[str]) -> str | None:
    """The configured label that occurs first in `text` as whole words, ignoring case; None when
    none does. At one position the longest label wins ("not spam" before "spam")."""
    by_key = {normalize(label): label for label in labels if normalize(label)}
    if not by_key:
        return None
    alternatives = "|".join(re.escape(k) for k in sorted(by_key, key=len, reverse=True))
    found = re.search(rf"(?<!\w)(?:{alternatives})(?!\w)", normalize(text))
    return by_key[found.group(0)] if found else None


def label_agreement(a: str, b: str, labels: Sequence[str]) -> float | None:
    """1.0 when both answers name the same label first, 0.0 when they differ or only one names a
    label; None when `labels` is empty (not a classification route) or neither answer names a
    label (no label to agree on: the text scores judge that pair)."""
    la, lb = extract_label(a, labels), extract_label(b, labels)
    if la is None and lb is None:
        return None
    return 1.0 if la == lb else 0.0


# --- embeddings ----------------------------------------------------------------------------------


def cosine(u: Vector, v: Vector) -> float:
    """Cosine of the angle between two vectors of equal length, in [-1, 1]."""
    if len(u) != len(v):
        raise ValueError(f"cosine needs vectors of equal length, got {len(u)} and {len(v)}")
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(y * y for y in v))
    if nu == 0 or nv == 0:
        raise ValueError("cosine of a zero vector is undefined; embeddings must be non-zero")
    dot = sum(x * y for x, y in zip(u, v, strict=True))
    return float(max(-1.0, min(1.0, dot / (nu * nv))))  # rounding can step past ±1


# --- the combined score --------------------------------------------------------------------------


class ScoreWeights(BaseModel):
    """Weights of each similarity in `disagreement` (config); 0 leaves a score out.

    Starting points, not tuned: meaning (semantic, label) outweighs wording (edit, ROUGE-L);
    a classification route is judged mostly by its label.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    exact_match: Weight = Field(0.5, description="equal after normalisation")
    edit_similarity: Weight = Field(0.5, description="character edit similarity")
    rouge_l: Weight = Field(1.0, description="ROUGE-L F1 over words")
    length_ratio: Weight = Field(0.5, description="shorter / longer, in words")
    json_agreement: Weight = Field(1.0, description="both JSON or one not (when either is)")
    json_equal: Weight = Field(1.0, description="same JSON value (when both are JSON)")
    label_agreement: Weight = Field(4.0, description="same label (classification routes)")
    semantic: Weight = Field(2.0, description="embedding cosine (when an embedder runs)")
    format_agreement: Weight = Field(1.0, description="both answers conform to the request's "
                                     "response_format (when either does)")
    tool_name_agreement: Weight = Field(2.0, description="same functions called (tool calls)")
    tool_args_agreement: Weight = Field(2.0, description="same calls, arguments included")
    field_agreement_normalized: Weight = Field(
        2.0, description="share of JSON keys with the same value (structured requests)")

    @model_validator(mode="after")
    def _some_weight(self) -> ScoreWeights:
        if not any(self.model_dump().values()):
            raise ValueError("at least one score weight must be positive; all are 0")
        return self


DEFAULT_WEIGHTS = ScoreWeights()


def combine(scores: Mapping[str, float | None], weights: ScoreWeights = DEFAULT_WEIGHTS) -> float:
    """`disagreement` in [0, 1]: 1 - the weighted mean of the scores that are not None.

    Scores that are None or missing drop out and the remaining weights are renormalised; keys
    that are not weights (e.g. `disagreement`) are ignored. Raises ValueError when a score is
    outside [0, 1] or when no score with a positive weight is available.
    """
    total = weighted = 0.0
    for name, weight in weights.model_dump().items():
        score = scores.get(name)
        if score is None:
            continue
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score {name}={score!r} is outside [0, 1]")
        total += weight
        weighted += weight * score
    if total == 0:
        available = sorted(k for k, v in scores.items() if v is not None)
        raise ValueError(
            f"no score with a positive weight is available (scores: {available}); "
            "give a positive weight to a score that always applies, e.g. rouge_l"
        )
    return min(1.0, max(0.0, 1.0 - weighted / total))


def score_pair(
    student: str,
    teacher: str,
    *,
    labels: Sequence[str] = (),
    weights: ScoreWeights = DEFAULT_WEIGHTS,
    embed: Embed | None = None,
    conforms: Callable[[str], bool] | None = None,
) -> dict[str, float | None]:
    """Every score of the table above for one pair, plus `disagreement` (`combine`).

    `embed` maps a list of texts to one vector each (`SemanticEmbedder`); it is called once with
    `[student, teacher]`, and `semantic` is None without it. Negative cosines count as 0.
    `conforms` is the request's response format as a test (`format_scores`); None: it had none.
    """
    scores: dict[str, float | None] = {
        "exact_match": exact_match(student, teacher),
        "edit_similarity": edit_similarity(student, teacher),
        "rouge_l": rouge_l(student, teacher),
        "length_ratio": length_ratio(student, teacher),
        "json_agreement": json_agreement(student, teacher),
        "json_equal": json_equal(student, teacher),
        "label_agreement": label_agreement(student, teacher, labels),
        "semantic": None,
    }
    if conforms is not None:
        scores.update(format_scores(student, teacher, conforms))
    scores.update(tool_scores(student, teacher))
    if embed is not None:
        vectors = embed([student, teacher])
        if len(vectors) != 2:
            raise ValueError(f"embed returned {len(vectors)} vectors for 2 texts")
        scores["semantic"] = max(0.0, cosine(vectors[0], vectors[1]))
    scores["disagreement"] = combine(scores, weights)
    return scores
