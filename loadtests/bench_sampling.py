"""Which default temperature / top_p should the packaged student serve with (not a test)?

Answers the task suite's dev split (`--limit` cases per family, the gate split is never used)
with the packaged student at each sampling setting, seeded per case, and prints the pass rate
with its Wilson interval and the paired difference against OpenAI's default (1.0, 1.0).

    .venv/bin/python loadtests/bench_sampling.py [--limit 10] [--settings 1:1,0.7:0.9,0.2:0.9,0:1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill import paired  # noqa: E402
from distill.evaluate import DEFAULT_SUITE  # noqa: E402
from distill.tasks import load_suite, score, summary  # noqa: E402
from serving.engines import (  # noqa: E402
    GenerationRequest,
    Message,
    SamplingParams,
    build_engine,
    merge_deltas,
)
from serving.engines.config import LlamaCppEngine  # noqa: E402

STUDENT = ROOT / "models/student/SmolLM2-135M-Instruct.Q4_1.gguf"


async def answers(cases, settings, model: Path, threads: int) -> dict:
    engine = build_engine(LlamaCppEngine(path=str(model), n_ctx=2048, n_threads=threads),
                          lambda p: p)
    await engine.start()
    out: dict = {s: [] for s in settings}
    try:
        for i, case in enumerate(cases):  # settings alternate on each case: same conditions
            messages = tuple(Message(m["role"], m["content"]) for m in case.messages)
            for t, p in settings:
                params = SamplingParams(case.max_tokens, temperature=t, top_p=p, seed=i)
                deltas = [d async for d in engine.generate(
                    GenerationRequest(f"s{i}", params, messages=messages))]
                out[(t, p)].append(merge_deltas(deltas).text)
    finally:
        await engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=10, help="dev cases per family")
    ap.add_argument("--settings", default="1:1,0.7:0.9,0.2:0.9,0:1",
                    help="temperature:top_p pairs; the first is the baseline")
    ap.add_argument("--model", type=Path, default=STUDENT)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    settings = [tuple(float(x) for x in s.split(":")) for s in args.settings.split(",")]
    cases = load_suite(DEFAULT_SUITE, splits=("dev",), limit=args.limit)
    texts = asyncio.run(answers(cases, settings, args.model, args.threads))
    rows = {s: score(cases, texts[s]) for s in settings}
    base = [r["passed"] for r in rows[settings[0]]]
    print(f"{len(cases)} dev cases, {args.model.name}\n")
    print("| temperature | top_p | pass rate [95% CI] | vs first [95% CI] | McNemar p |")
    print("|---|---|---|---|---|")
    for s in settings:
        got = summary(rows[s])["overall"]
        c = paired.compare("tasks", base, [r["passed"] for r in rows[s]], margin=0.0)
        print(f"| {s[0]} | {s[1]} | {got['rate']:.3f} [{got['low']:.3f}, {got['high']:.3f}] | "
              f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] | "
              f"{c['mcnemar']['p_value']:.3g} |")


if __name__ == "__main__":
    main()
