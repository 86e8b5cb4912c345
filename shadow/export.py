"""`protege dataset export`: stored pairs become chat-format training examples for distill.

Each example is the user's (redacted) messages followed by the teacher's answer as the assistant
turn, or what a reviewer's label makes of it (`shadow.labels`: a corrected answer, the student's,
or no example), with the pair's ids, scores and the teacher's top-k logprobs beside it. Pure
pieces: `to_example` (a pair, or None when it cannot teach: no prompt stored, empty or unfinished
teacher answer, a label that leaves it out), `content_key` (what dedupe and the split hash), `split_of` (train or
validation by hash, so an example never moves between splits as the data grows), and
`FeedbackFilter`. `write_examples` writes JSONL or Parquet.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.engines.base import Message
from serving.engines.tools import ToolCall, parse_tools, prompt_messages
from shadow.labels import Label, StudentBetter, target_of
from shadow.records import FeedbackRecord, PairRecord

FORMATS = ("jsonl", "parquet")


def messages_of(pair: PairRecord) -> list[dict[str, str]] | None:
    """The request as plain chat messages (a completion prompt becomes one user message). Tools
    and tool turns are written in as a model without a tool template sees them
    (`serving.engines.tools.prompt_messages`), so a student learns its calls under the same
    prompt."""
    if pair.request.get("messages"):
        stored = pair.request.get("tools")
        use = parse_tools(stored["tools"], stored["tool_choice"],
                          stored["parallel_tool_calls"]) if stored else None
        return prompt_messages([_message(m) for m in pair.request["messages"]], use, False)[0]
    if pair.request.get("prompt"):
        return [{"role": "user", "content": pair.request["prompt"]}]
    return None


def _message(m: dict[str, Any]) -> Message:
    calls = tuple(ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"])
                  for c in m.get("tool_calls") or ())
    return Message(m["role"], m["content"], calls, m.get("tool_call_id"))


def to_example(pair: PairRecord, label: Label | None = None,
               student_better: StudentBetter = StudentBetter.drop) -> dict[str, Any] | None:
    """The pair as a chat example whose assistant turn is `shadow.labels.target_of` the pair's
    label: the teacher's answer unless a reviewer corrected it or chose otherwise."""
    messages = messages_of(pair)
    teacher = pair.teacher
    usable = teacher.text if teacher.text.strip() and teacher.finish_reason is not None else None
    chosen = target_of(label, usable, pair.student.text or None, student_better)
    if messages is None or chosen is None or chosen[0] is None:
        return None
    target, source = chosen
    return {
        "id": pair.pair_id,
        "messages": [*messages, {"role": "assistant", "content": target}],
        "route": pair.route,
        "created_at": pair.created_at,
        "student_model": pair.student.model,
        "student_version": pair.student.version,
        "student_answer": pair.student.text,
        "teacher_model": teacher.model,
        "teacher_finish_reason": teacher.finish_reason,
        "disagreement": pair.disagreement,
        "teacher_logprobs": pair.teacher_logprobs if source == "teacher" else None,
        "label": None if label is None else label.verdict,
        "target": source,
        # the request's response_format (JSON text; None: free text), so training and
        # evaluation can put the student under the same conditions
        "response_format": _response_format(pair),
        # the tools it offered, as the client sent them (JSON text; None: no tools); the
        # messages above already show them to the student
        "tools": _json_text(pair.request.get("tools")),
    }


def _response_format(pair: PairRecord) -> str | None:
    return _json_text((pair.request.get("params") or {}).get("response_format"))


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)


def content_key(messages: list[dict[str, str]]) -> str:
    """A stable hash of the prompt messages (not the answer): duplicates share it."""
    text = json.dumps(messages, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def split_of(key: str, validation_share: float) -> str:
    """`validation` for about `validation_share` of keys, always the same for a key."""
    bucket = int(key[:8], 16) / 0xFFFFFFFF
    return "validation" if bucket < validation_share else "train"


@dataclass(frozen=True)
class FeedbackFilter:
    """`metric=value` keeps pairs with such feedback; `metric!=value` drops them."""

    metric: str
    value: float
    keep: bool

    @classmethod
    def parse(cls, text: str) -> FeedbackFilter:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(!?=)\s*(\S+)\s*", text)
        if not m:
            raise ValueError(f"{text!r}: write METRIC=VALUE or METRIC!=VALUE, e.g. "
                             "thumbs_up=true")
        raw = m.group(3).lower()
        try:
            value = {"true": 1.0, "false": 0.0}[raw] if raw in ("true", "false") else float(raw)
        except ValueError:
            raise ValueError(f"{text!r}: the value must be true, false or a number") from None
        return cls(m.group(1), value, m.group(2) == "=")

    def matches(self, values: dict[str, list[float]]) -> bool:
        hit = self.value in values.get(self.metric, ())
        return hit if self.keep else not hit


def select(pairs: Iterable[PairRecord], feedback: Iterable[FeedbackRecord],
           filters: list[FeedbackFilter], validation_share: float,
           labels: Mapping[str, Label] | None = None,
           student_better: StudentBetter = StudentBetter.drop,
           labelled_only: bool = False) -> Iterator[dict[str, Any]]:
    """Examples deduped by prompt, each with its `split`, in the order prompts first appear.

    `labels`: each pair's current label (`shadow.labels.latest`). A reviewed pair speaks for its
    prompt: it replaces an unreviewed duplicate, and when its label leaves it out (both wrong,
    student better and dropped) the prompt is left out. Otherwise the first pair is kept."""
    labels = labels or {}
    by_response: dict[str, dict[str, list[float]]] = {}
    if filters:
        for f in feedback:
            if f.value is not None:
                by_response.setdefault(f.response.response_id, {}).setdefault(
                    f.metric, []).append(f.value)
    chosen: dict[str, tuple[bool, dict[str, Any] | None]] = {}  # key -> (reviewed, example)
    for pair in pairs:
        if filters and not all(f.matches(by_response.get(pair.pair_id, {})) for f in filters):
            continue
        label = labels.get(pair.pair_id)
        messages = messages_of(pair)
        if messages is None or (labelled_only and label is None):
            continue
        key = content_key(messages)
        reviewed, example = chosen.get(key, (False, None))
        if key not in chosen or (not reviewed and (label is not None or example is None)):
            chosen[key] = (label is not None, to_example(pair, label, student_better))
    for key, (_, example) in chosen.items():
        if example is not None:
            yield {**example, "split": split_of(key, validation_share)}


def write_examples(examples: Iterable[dict[str, Any]], out_dir: Path, fmt: str) -> dict[str, int]:
    """`<out_dir>/train.<fmt>` and `validation.<fmt>`; the number written to each."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} (allowed: {', '.join(FORMATS)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for e in examples:
        splits[e["split"]].append(e)
    for split, rows in splits.items():
        path = out_dir / f"{split}.{fmt}"
        tmp = path.with_suffix(path.suffix + ".tmp")
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            _write_parquet(rows, tmp)
        tmp.replace(path)  # a reader never sees half a file
    return {split: len(rows) for split, rows in splits.items()}


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([
        ("id", pa.string()), ("messages", pa.list_(message)), ("route", pa.string()),
        ("created_at", pa.string()), ("student_model", pa.string()),
        ("student_version", pa.string()), ("student_answer", pa.string()),
        ("teacher_model", pa.string()), ("teacher_finish_reason", pa.string()),
        ("disagreement", pa.float64()), ("teacher_logprobs", pa.string()), ("label", pa.string()),
        ("target", pa.string()), ("split", pa.string()), ("response_format", pa.string()),
        ("tools", pa.string()),
    ])
    columns = {name: [r[name] for r in rows] for name in schema.names}
    columns["teacher_logprobs"] = [  # nested and ragged: kept as JSON text
        None if v is None else json.dumps(v, ensure_ascii=False)
        for v in columns["teacher_logprobs"]]
    pq.write_table(pa.table(columns, schema=schema), path)
