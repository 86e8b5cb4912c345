"""Function calling on the packaged models (not a test): are the calls valid, and right?

24 requests (6 cities x 2 functions x 2 phrasings) offer two tools, `get_weather(city, unit)` and
`get_time(city)`, each question needing exactly one call. Student and teacher, greedy, each asked
three ways: free (the tools in the prompt, nothing constrained, the answer read for calls),
`auto` (constrained once a call opens) and `required` (constrained to one call). Reports the share
of answers that are a valid call (a declared function, arguments valid against its schema), and
the share that call the right function for the right city, with Wilson intervals.

    .venv/bin/python loadtests/bench_tools.py [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill.gate.checks import wilson_interval  # noqa: E402
from serving.engines import GenerationRequest, Message, SamplingParams, build_engine  # noqa: E402
from serving.engines.config import LlamaCppEngine  # noqa: E402
from serving.engines.structured import check_answer  # noqa: E402
from serving.engines.tools import parse_tools, read_calls  # noqa: E402

MODELS = {
    "student": ROOT / "models/student/SmolLM2-135M-Instruct.Q4_1.gguf",
    "teacher": ROOT / "models/teacher/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
}
CITIES = ["Paris", "Rome", "Tokyo", "Cairo", "Lima", "Oslo"]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The current local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": False}}},
]
QUESTIONS = {
    "get_weather": ["What's the weather like in {city} right now?",
                    "Is it raining in {city}? Check the weather."],
    "get_time": ["What time is it in {city}?", "Tell me the current local time in {city}."],
}
NAMES = ("get_weather", "get_time")


def cases() -> list[tuple[str, str, str]]:
    return [(q.format(city=city), fn, city) for fn, qs in QUESTIONS.items() for q in qs
            for city in CITIES]


async def answer(engine, question: str, mode: str) -> str:
    use = parse_tools(TOOLS, "auto" if mode == "free" else mode, False)
    fmt = None if mode == "free" else use.format()
    request = GenerationRequest("bench", SamplingParams(96, temperature=0.0, response_format=fmt),
                                messages=(Message("user", question),), tools=use)
    return "".join([d.text async for d in engine.generate(request)])


def rate(k: int, n: int) -> str:
    low, high = wilson_interval(k, n)
    return f"{k / n:.3f} [{low:.3f}, {high:.3f}]"


async def run(name: str, path: Path) -> list[dict]:
    engine = build_engine(LlamaCppEngine(path=str(path), n_ctx=2048, n_threads=2),
                          resolve_path=lambda p: p)
    await engine.start()
    required = parse_tools(TOOLS, "required", False).format()
    rows = []
    try:
        for mode in ("free", "auto", "required"):
            valid = right = 0
            for question, fn, city in cases():
                text = await answer(engine, question, mode)
                _, calls = read_calls(text, NAMES, "bench", 0)
                ok = bool(calls) and check_answer(required, text) is None
                valid += ok
                right += ok and calls[0].name == fn and \
                    json.loads(calls[0].arguments).get("city", "").lower() == city.lower()
            n = len(cases())
            rows.append({"model": name, "mode": mode, "n": n, "valid": valid, "right": right})
            print(f"{name:8} {mode:9} valid call {rate(valid, n)}   right call {rate(right, n)}",
                  flush=True)
    finally:
        await engine.close()
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    rows = []
    for name, path in MODELS.items():
        rows += await run(name, path)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
