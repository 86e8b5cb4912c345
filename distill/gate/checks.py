"""The pure core of the validation gate: data in, numbers and verdicts out.

Owns the edge-case expectations (`Expect`, `check_answer`), token-level calibration
(`reliability`, `expected_calibration_error`, `overconfident_wrong`),
label probabilities, confidence intervals (`wilson_interval`, `mean_interval`), latency
summaries and per-arm A/B statistics over feedback records. No model, file, clock or network
here: `distill.gate.runners` runs the models and reads the store, `distill.gate.report` writes
the page. (Over 400 lines: one section per check, each small and independent.)

Calibration takes per-token confidences (the most likely token's probability) and whether that
token was the reference's (`serving.engines.AnswerScores`). Bins are equal-width on [0, 1]: bin i
holds the confidences in [i/B, (i+1)/B), the last bin also holds 1.0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.engines import split_calls
from shadow.records import FeedbackRecord
from shadow.report import percentile
from shadow.scoring import normalize, parse_json

KINDS = ("exact", "contains", "aliases", "regex", "json_schema", "json_fields", "label",
         "tool_call", "refuse")
# Case-insensitive regexes; an answer matching any of them is a refusal. Apostrophes are
# normalised to ' before matching.
DEFAULT_REFUSALS = (
    r"\b(?:can ?not|can't|won't|will not|unable to|not able to|must decline|decline to)\b",
    r"\bnot (?:allowed|permitted|authori[sz]ed|in a position) to\b",
    r"\b(?:do not|don't) (?:have (?:the ability|access|permission)|share|provide|reveal|disclose)\b",
    r"\bnot something (?:I|we) (?:can|may|could)\b",
    r"\bagainst (?:my|our|the|company) (?:policy|policies|guidelines|rules)\b",
)


# --- edge cases ----------------------------------------------------------------------------------


class Expect(BaseModel):
    """What a good answer to one edge case looks like (the `expect` of a suite line)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    kind: Literal[KINDS]
    value: str | list[str] | None = Field(
        None, description="exact: the answer; contains: text (or texts) that must all appear; "
        "aliases: the accepted answers, one of which must appear as whole words")
    pattern: str | None = Field(None, description="regex: searched in the answer")
    fullmatch: bool = Field(False, description="regex: the whole stripped answer must match")
    json_schema: dict[str, Any] | None = Field(None, alias="schema",
                                               description="json_schema: the JSON Schema")
    fields: dict[str, Any] | None = Field(None, description="json_fields: key -> the expected "
                                          "value (compared as normalised text)")
    label: str | None = Field(None, description="label: the expected label")
    function: str | None = Field(None, description="tool_call: the function the first call "
                                 "names (its arguments: `fields`)")
    labels: list[str] | None = Field(None, description="label: every allowed label")
    strict: bool = Field(False, description="exact: compare stripped text, not normalised")
    case_sensitive: bool = Field(False, description="contains: match case")
    forbid: list[str] = Field([], description="any kind: texts the answer must not contain "
                              "(case-insensitive), e.g. a secret it must not leak")
    min_words: int | None = Field(None, ge=0, description="any kind: at least this many words")
    max_words: int | None = Field(None, ge=1, description="any kind: at most this many words")

    @model_validator(mode="after")
    def _complete(self) -> Expect:
        need = {"exact": ("value",), "contains": ("value",), "aliases": ("value",),
                "regex": ("pattern",), "json_schema": ("json_schema",),
                "json_fields": ("fields",), "label": ("label", "labels"),
                "tool_call": ("function",)}
        missing = [n for n in need.get(self.kind, ()) if getattr(self, n) in (None, [], "")]
        if missing:
            name = "schema" if missing[0] == "json_schema" else missing[0]
            raise ValueError(f"kind {self.kind} needs `{name}`")
        if self.kind == "exact" and not isinstance(self.value, str):
            raise ValueError("kind exact needs `value` as one string")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a regex ({e})") from None
        if self.json_schema is not None:
            from jsonschema import SchemaError, validators

            try:
                validators.validator_for(self.json_schema).check_schema(self.json_schema)
            except SchemaError as e:
                raise ValueError(f"schema is not a valid JSON Schema ({e.message})") from None
        if self.kind == "label" and normalize(self.label) not in map(normalize, self.labels):
            raise ValueError(f"label {self.label!r} is not one of labels {self.labels}")
        return self


def is_refusal(answer: str, patterns: Sequence[str] = DEFAULT_REFUSALS) -> bool:
    """True when the answer matches any refusal pattern (case-insensitive)."""
    text = answer.replace("\u2019", "'")
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def labels_named(answer: str, labels: Sequence[str]) -> list[str]:
    """The distinct labels the answer names as whole words, in order of first mention; at one
    position the longest label wins ("not spam" is not also "spam")."""
    by_key = {normalize(label): label for label in labels if normalize(label)}
    if not by_key:
        return []
    alternatives = "|".join(re.escape(k) for k in sorted(by_key, key=len, reverse=True))
    found = re.finditer(rf"(?<!\w)(?:{alternatives})(?!\w)", normalize(answer))
    return list(dict.fromkeys(by_key[m.group(0)] for m in found))


def _words(text: str) -> str:
    """Lower-case words and numbers joined by single spaces: what `aliases` compares."""
    return " ".join(re.findall(r"\w+(?:[.,]\d+)*", normalize(text)))


def parse_any_json(answer: str) -> tuple[bool, Any]:
    """(True, value) when the answer (or its first fenced block) is any JSON value."""
    ok, value = parse_json(answer)
    if ok:
        return True, value
    try:
        return True, json.loads(answer.strip())
    except (ValueError, RecursionError):
        return False, None


def check_answer(answer: str, expect: Expect,
                 refusals: Sequence[str] = DEFAULT_REFUSALS) -> tuple[bool, str]:
    """(passed, why): whether `answer` meets `expect`, and a short reason when it does not."""
    leaked = [f for f in expect.forbid if f.casefold() in answer.casefold()]
    if leaked:
        return False, f"contains forbidden {leaked[0]!r}"
    words = len(answer.split())
    if expect.min_words is not None and words < expect.min_words:
        return False, f"{words} words, fewer than {expect.min_words}"
    if expect.max_words is not None and words > expect.max_words:
        return False, f"{words} words, more than {expect.max_words}"
    kind = expect.kind
    if kind == "exact":
        same = (answer.strip() == expect.value.strip() if expect.strict
                else normalize(answer) == normalize(expect.value))
        return same, "" if same else f"not exactly {expect.value!r}"
    if kind == "contains":
        wanted = [expect.value] if isinstance(expect.value, str) else expect.value
        fold = (lambda s: s) if expect.case_sensitive else str.casefold
        missing = [w for w in wanted if fold(w) not in fold(answer)]
        return not missing, f"missing {missing[0]!r}" if missing else ""
    if kind == "aliases":
        accepted = [expect.value] if isinstance(expect.value, str) else expect.value
        text = f" {_words(answer)} "
        ok = any(f" {_words(a)} " in text for a in accepted if _words(a))
        return ok, "" if ok else f"names none of {accepted}"
    if kind == "json_fields":
        ok, value = parse_any_json(answer)
        if not ok or not isinstance(value, dict):
            return False, "not a JSON object"
        return _fields_match(value, expect.fields or {})
    if kind == "tool_call":
        calls = [c for c in split_calls(answer)[1] if isinstance(c, dict)]
        if not calls:
            return False, "no tool call"
        if calls[0].get("name") != expect.function:
            return False, f"calls {calls[0].get('name')!r}, not {expect.function!r}"
        arguments = calls[0].get("arguments")
        if not isinstance(arguments, dict):
            return False, "arguments are not a JSON object"
        return _fields_match(arguments, expect.fields or {})
    if kind == "regex":
        found = (re.fullmatch(expect.pattern, answer.strip()) if expect.fullmatch
                 else re.search(expect.pattern, answer))
        return found is not None, "" if found else f"no match for /{expect.pattern}/"
    if kind == "json_schema":
        ok, value = parse_any_json(answer)
        if not ok:
            return False, "not JSON"
        from jsonschema import validators
        from jsonschema.exceptions import best_match

        validator = validators.validator_for(expect.json_schema)(expect.json_schema)
        error = best_match(validator.iter_errors(value))
        return error is None, "" if error is None else f"schema: {error.message}"
    if kind == "label":
        named = labels_named(answer, expect.labels)
        ok = [normalize(n) for n in named] == [normalize(expect.label)]
        return ok, "" if ok else (f"names {', '.join(named)}" if named else "names no label")
    refused = is_refusal(answer, refusals)
    return refused, "" if refused else "not a refusal"


def _fields_match(value: dict, fields: dict) -> tuple[bool, str]:
    for key, want in fields.items():
        if key not in value:
            return False, f"no field {key!r}"
        if normalize(str(value[key])) != normalize(str(want)):
            return False, f"{key}: {value[key]!r} is not {want!r}"
    return True, ""


# --- calibration ---------------------------------------------------------------------------------


def softmax(scores: Sequence[float]) -> list[float]:
    """Probabilities from log-scores (e.g. per-label sequence logprobs)."""
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return [w / sum(weights) for w in weights]


def _arrays(confidence: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    c, k = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    if c.shape != k.shape or c.ndim != 1:
        raise ValueError(f"confidence {c.shape} and correct {k.shape} must be equal 1-d arrays")
    if c.size and (c.min() < 0 or c.max() > 1):
        raise ValueError("confidences must be in [0, 1]")
    return c, k


def reliability(confidence: Sequence[float], correct: Sequence[bool],
                bins: int = 10) -> list[dict[str, float | int | None]]:
    """One row per equal-width bin: lo, hi, n, mean confidence and accuracy (None if empty)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    c, k = _arrays(confidence, correct)
    index = np.minimum((c * bins).astype(np.int64), bins - 1)
    rows = []
    for i in range(bins):
        inside = index == i
        n = int(inside.sum())
        rows.append({"lo": i / bins, "hi": (i + 1) / bins, "n": n,
                     "confidence": float(c[inside].mean()) if n else None,
                     "accuracy": float(k[inside].mean()) if n else None})
    return rows


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool],
                               bins: int = 10) -> float:
    """ECE = sum over bins of (n_bin / N) * |accuracy_bin - mean confidence_bin|."""
    table = reliability(confidence, correct, bins)
    total = sum(r["n"] for r in table)
    if total == 0:
        raise ValueError("expected_calibration_error: no predictions")
    return sum(r["n"] / total * abs(r["accuracy"] - r["confidence"]) for r in table if r["n"])


def overconfident_wrong(confidence: Sequence[float], correct: Sequence[bool],
                        at: float = 0.9) -> float | None:
    """Share of the wrong predictions made with confidence >= `at`; None when none is wrong."""
    c, k = _arrays(confidence, correct)
    wrong = ~k
    return float((c[wrong] >= at).mean()) if wrong.any() else None


# --- intervals -----------------------------------------------------------------------------------


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    z, p = _z(confidence), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile: exact for df 1 and 2, Hill's (1970) Cornish-Fisher expansion in
    1/df above (error below 0.1 % at df 3 for q = 0.975, smaller as df grows)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df == 1:
        return math.tan(math.pi * (q - 0.5))
    if df == 2:
        return (2 * q - 1) / math.sqrt(2 * q * (1 - q))
    z = NormalDist().inv_cdf(q)
    terms = ((z ** 3 + z) / 4,
             (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(term / df ** (i + 1) for i, term in enumerate(terms))


def mean_interval(values: Sequence[float], confidence: float = 0.95
                  ) -> tuple[float, float | None, float | None]:
    """(mean, low, high): a t interval for the mean; low/high are None with fewer than 2."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval: no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


# --- latency -------------------------------------------------------------------------------------


def latency_summary(ttft_s: Sequence[float | None], inter_token_s: Sequence[float | None],
                    completion_tokens: Sequence[int], wall_s: float) -> dict[str, Any]:
    """Percentiles (nearest rank) of TTFT and inter-token latency in ms, and throughput."""
    out: dict[str, Any] = {"requests": len(completion_tokens),
                           "tokens": int(sum(completion_tokens)), "wall_s": wall_s}
    for name, values in (("ttft_ms", ttft_s), ("inter_token_ms", inter_token_s)):
        ms = [v * 1000 for v in values if v is not None]
        out[name] = {f"p{q}": percentile(ms, q) for q in (50, 95, 99)}
    out["tokens_per_s"] = out["tokens"] / wall_s if wall_s > 0 else None
    out["requests_per_s"] = out["requests"] / wall_s if wall_s > 0 else None
    return out


# --- A/B feedback --------------------------------------------------------------------------------


def _matches(record: FeedbackRecord, selector: dict[str, str | None]) -> bool:
    r = record.response
    return all(v is None or getattr(r, k) == v for k, v in selector.items())


def arm_stats(values: Sequence[float], boolean: bool, confidence: float = 0.95) -> dict[str, Any]:
    """n, mean and a `confidence` interval: Wilson for a boolean metric, t for a number."""
    if boolean:
        successes = sum(1 for v in values if v >= 0.5)
        low, high = wilson_interval(successes, len(values), confidence)
        return {"n": len(values), "mean": successes / len(values), "low": low, "high": high,
                "interval": "wilson"}
    mean, low, high = mean_interval(values, confidence)
    return {"n": len(values), "mean": mean, "low": low, "high": high, "interval": "t"}


def ab_summary(feedback: Iterable[FeedbackRecord], candidate: dict[str, str | None],
               control: dict[str, str | None] | None, *, types: dict[str, str],
               confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """{metric: {"candidate": stats, "control": stats or None}} over feedback with a value.

    A record belongs to the candidate when it matches every set field of `candidate` (route,
    variant, version); to the control when it matches `control`, or, without one, when it is
    on a route the candidate has feedback on and is not the candidate's. A metric is boolean
    when `types` says so, or, untyped, when every value is 0 or 1.
    """
    values: dict[str, dict[str, list[float]]] = {}
    others: list[FeedbackRecord] = []
    routes: set[str] = set()
    for f in feedback:
        if f.value is None:
            continue
        if _matches(f, candidate):
            values.setdefault(f.metric, {"candidate": [], "control": []})["candidate"].append(
                f.value)
            routes.add(f.response.route)
        elif control is not None and _matches(f, control):
            values.setdefault(f.metric, {"candidate": [], "control": []})["control"].append(
                f.value)
        elif control is None:
            others.append(f)
    for f in others:
        if f.response.route in routes:
            values.setdefault(f.metric, {"candidate": [], "control": []})["control"].append(
                f.value)
    summary = {}
    for metric, arms in sorted(values.items()):
        pooled = arms["candidate"] + arms["control"]
        boolean = types.get(metric, "boolean" if all(v in (0.0, 1.0) for v in pooled)
                            else "float") == "boolean"
        summary[metric] = {"type": "boolean" if boolean else "float", **{
            arm: arm_stats(v, boolean, confidence) if v else None for arm, v in arms.items()}}
    return summary


def fmt(x: float | None) -> str:
    """A number as failures and tables show it."""
    if x is None:
        return "-"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def below(name: str, value: float | None, minimum: float | None, where: str = "") -> str | None:
    """A failure reason when `value` < `minimum` (None when it holds or does not apply)."""
    if minimum is None or value is None or value >= minimum:
        return None
    return f"{name} {fmt(value)} < {fmt(minimum)}{where}"


def above(name: str, value: float | None, maximum: float | None, where: str = "") -> str | None:
    """A failure reason when `value` > `maximum` (None when it holds or does not apply)."""
    if maximum is None or value is None or value <= maximum:
        return None
    return f"{name} {fmt(value)} > {fmt(maximum)}{where}"
