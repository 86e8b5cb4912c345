"""Structured outputs on the packaged models (not a test): do answers validate, and at what cost?

1. Extraction: the first `--cases` JSON-extraction cases of the task suite's dev split, asked
   with a `json_schema` built from each case's fields (strings, or numbers where the reference
   has numbers; all required; no other keys). Student and teacher, greedy, each case answered
   unconstrained and constrained. Reports the share of answers that validate against the schema
   and the share whose fields are right (the case's own check), with Wilson intervals, and the
   paired difference constrained - unconstrained (McNemar).
2. Speed: decode tokens/s of the student, constrained vs unconstrained, measured alternately on
   the same prompts (A B A B): the ratio of the medians.
3. Compile time: `--schemas` distinct schemas (cache misses) compiled and matched against the
   student's vocabulary; p50 and p99 in milliseconds, and a cached lookup for comparison.

    .venv/bin/python loadtests/bench_structured.py [--cases 30] [--schemas 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill import paired  # noqa: E402
from distill.answers import chat_messages  # noqa: E402
from distill.evaluate import DEFAULT_SUITE  # noqa: E402
from distill.gate.checks import check_answer as check_case  # noqa: E402
from distill.gate.checks import wilson_interval  # noqa: E402
from distill.tasks import load_suite  # noqa: E402
from serving.engines import GenerationRequest, SamplingParams, build_engine  # noqa: E402
from serving.engines.config import LlamaCppEngine  # noqa: E402
from serving.engines.constrain import TokenConstraint  # noqa: E402
from serving.engines.structured import check_answer, grammar_for, parse_response_format  # noqa: E402

MODELS = {
    "student": ROOT / "models/student/SmolLM2-135M-Instruct.Q4_1.gguf",
    "teacher": ROOT / "models/teacher/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
}


def schema_for(reference: str) -> dict:
    """The schema an application would send for this case: its keys, typed like the reference."""
    fields = json.loads(reference)
    kinds = {k: "number" if isinstance(v, int | float) else "string" for k, v in fields.items()}
    return {"type": "object", "properties": {k: {"type": t} for k, t in kinds.items()},
            "required": list(fields), "additionalProperties": False}


def response_format(schema: dict):
    return parse_response_format({"type": "json_schema",
                                  "json_schema": {"name": "fields", "schema": schema}})


async def generate(engine, messages, fmt, max_tokens=96):
    request = GenerationRequest("bench", SamplingParams(max_tokens, temperature=0.0,
                                                        response_format=fmt),
                                messages=chat_messages(messages))
    first, text, tokens = None, [], 0
    async for delta in engine.generate(request):
        if first is None and delta.token_ids:
            first = time.perf_counter()
        text.append(delta.text)
        tokens += len(delta.token_ids)
    done = time.perf_counter()
    decode_s = done - first if first is not None else 0.0
    return "".join(text), tokens, decode_s


def rate(k: int, n: int) -> str:
    low, high = wilson_interval(k, n)
    return f"{k / n:.3f} [{low:.3f}, {high:.3f}]"


async def extraction(name: str, path: Path, cases) -> dict:
    engine = build_engine(LlamaCppEngine(path=str(path), n_ctx=2048, n_threads=2), lambda p: p)
    await engine.start()
    rows = {"free": [], "constrained": []}
    speed = {"free": [], "constrained": []}
    try:
        for case in cases:
            fmt = response_format(schema_for(case.reference))
            for mode in ("free", "constrained"):  # alternately, on the same prompt
                text, tokens, decode_s = await generate(
                    engine, case.messages, fmt if mode == "constrained" else None)
                rows[mode].append({"valid": check_answer(fmt, text) is None,
                                   "correct": check_case(text, case.check)[0]})
                if tokens > 1 and decode_s > 0:
                    speed[mode].append((tokens - 1) / decode_s)
    finally:
        await engine.close()
    n = len(cases)
    out = {"model": name, "cases": n}
    for mode, got in rows.items():
        out[mode] = {"valid": rate(sum(r["valid"] for r in got), n),
                     "correct": rate(sum(r["correct"] for r in got), n)}
    gain = paired.compare("correct", [r["correct"] for r in rows["free"]],
                          [r["correct"] for r in rows["constrained"]], margin=0.0)
    out["correct_gain"] = {"difference": gain["difference"], "interval": [gain["low"],
                           gain["high"]], "mcnemar": gain["mcnemar"]}
    out["tokens_per_s"] = {m: round(statistics.median(v), 1) for m, v in speed.items() if v}
    if all(speed.values()):
        out["tokens_per_s"]["ratio"] = round(out["tokens_per_s"]["constrained"]
                                             / out["tokens_per_s"]["free"], 3)
    return out


def compile_times(n: int) -> dict:
    from llama_cpp import Llama

    from serving.engines.constrain import vocabulary_from_llamacpp

    llm = Llama(str(MODELS["student"]), n_ctx=64, vocab_only=True, verbose=False)
    vocabulary = vocabulary_from_llamacpp(llm._model.vocab)
    cold, warm = [], []
    for i in range(n):
        schema = {"type": "object", "properties": {
            f"field_{i}_{j}": {"type": ["string", "integer", "boolean"][j % 3]}
            for j in range(2 + i % 6)}, "required": [f"field_{i}_0"],
            "additionalProperties": False}
        fmt = response_format(schema)
        started = time.perf_counter()
        TokenConstraint(vocabulary, fmt)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        grammar_for(fmt)
        TokenConstraint(vocabulary, fmt)
        warm.append(time.perf_counter() - started)

    def pct(values, q):
        return round(1000 * sorted(values)[min(len(values) - 1, int(q * len(values)))], 3)

    return {"schemas": n, "cold_ms": {"p50": pct(cold, 0.5), "p99": pct(cold, 0.99)},
            "cached_ms": {"p50": pct(warm, 0.5), "p99": pct(warm, 0.99)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--schemas", type=int, default=200)
    ap.add_argument("--models", default="student,teacher")
    ap.add_argument("--out", type=Path, default=ROOT / "loadtests/out/structured.json")
    args = ap.parse_args()
    cases = load_suite(DEFAULT_SUITE, splits=("dev",), families=("extract",))[: args.cases]
    results = {"compile": compile_times(args.schemas), "extraction": []}
    print(json.dumps(results["compile"]), flush=True)
    for name in args.models.split(","):
        row = asyncio.run(extraction(name, MODELS[name], cases))
        results["extraction"].append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("| model | mode | valid | correct fields | decode tok/s |\n|---|---|---|---|---|")
    for row in results["extraction"]:
        for mode in ("free", "constrained"):
            print(f"| {row['model']} | {mode} | {row[mode]['valid']} | {row[mode]['correct']} | "
                  f"{row['tokens_per_s'].get(mode, '-')} |")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
