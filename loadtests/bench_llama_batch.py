"""llama.cpp's batch API alone, no gateway and no sampling: what one decode step of 1, 8 and 16
sequences costs on this CPU, per GGUF type; and the engine's batcher on the same file beside it
(not a test).

For the packaged student (SmolLM2-135M Q4_1) and, with --requantize, the same model requantized
by llama.cpp to other types (into a temporary folder): one context of as many sequences, each
prefilled with the same short prompt, then --steps decode steps of one token per sequence.
Prints tokens/s per batch size and type, and each type's batch-8 over batch-1 ratio. Flash
attention is off unless --flash-attn, as in the engine.

Then, per type, the llama.cpp engine (`serving.engines.llamacpp`, n_parallel 8, no gateway):
8 clients each ask 4 greedy chat answers of 24-64 tokens in turn, so generations end and join
while others run. Every llama_decode call is timed: the median of the steps that decode 8
answers and nothing else, set against the raw API's batch-8 step; the share of the wall time
spent in llama_decode; and the tokens/s the clients got (prompts and churn included).

    .venv/bin/python loadtests/bench_llama_batch.py --requantize Q8_0 Q4_0
    .venv/bin/python loadtests/bench_llama_batch.py --requantize Q8_0 Q4_0 --flash-attn
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from loadtests.bench_batching import packaged_student, requantized  # noqa: E402
from loadtests.bench_gateway import B_PROMPTS  # noqa: E402
from loadtests.bench_stats import fmt_num, fmt_ratio, median, table  # noqa: E402

PROMPT = b"Write a short story about a robot who learns to paint."
ENGINE_CLIENTS, ENGINE_ROUNDS = 8, 4  # the engine part: clients, and answers each asks in turn


def tokens_per_s(path: str, batch: int, threads: int, steps: int, flash_attn: bool) -> float:
    """Decode `steps` steps of `batch` sequences after their prompts; tokens/s of the steps."""
    import llama_cpp
    from llama_cpp import _internals

    llama_cpp.llama_backend_init()
    model = _internals.LlamaModel(path_model=path, params=llama_cpp.llama_model_default_params(),
                                  verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_seq_max, params.n_ctx = batch, 256 * batch
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)  # as the engine
    ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
    lb = _internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=batch, verbose=False)
    try:
        prompt = model.tokenize(PROMPT, True, False)
        for seq in range(batch):
            lb.reset()
            lb.add_sequence(prompt, seq, False)
            ctx.decode(lb)
        b = lb.batch
        started = time.perf_counter()
        for step in range(steps):
            for seq in range(batch):
                b.token[seq], b.pos[seq], b.n_seq_id[seq] = 100 + seq, len(prompt) + step, 1
                b.seq_id[seq][0], b.logits[seq] = seq, True
            b.n_tokens = batch
            ctx.decode(lb)
        return batch * steps / (time.perf_counter() - started)
    finally:
        lb.close()
        ctx.close()
        model.close()


async def engine_steps(path: str, threads: int, flash_attn: bool) -> dict[str, float]:
    """The llama.cpp engine with `ENGINE_CLIENTS` slots under as many clients (module doc): the
    median ms of its full-width decode steps, the share of wall time in llama_decode and the
    clients' tokens/s."""
    from serving.engines.base import GenerationRequest, Message, SamplingParams
    from serving.engines.config import LlamaCppEngine as LlamaCppConfig
    from serving.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(LlamaCppConfig(path=path, n_threads=threads, flash_attn=flash_attn,
                                           n_parallel=ENGINE_CLIENTS), Path)
    await engine.start()
    ctx, steps = engine.batcher.ctx, []
    decode = ctx.decode

    def timed(batch) -> None:
        started = time.perf_counter()
        decode(batch)
        steps.append((batch.batch.n_tokens, time.perf_counter() - started))

    async def answer(prompt: str, max_tokens: int) -> int:
        request = GenerationRequest("b", SamplingParams(max_tokens, temperature=0),
                                    messages=(Message("user", prompt),))
        return sum([len(d.token_ids) async for d in engine.generate(request)])

    async def client(i: int) -> int:
        return sum([await answer(B_PROMPTS[(i + k) % len(B_PROMPTS)], 24 + (7 * i + 13 * k) % 41)
                    for k in range(ENGINE_ROUNDS)])

    try:
        await asyncio.gather(*(answer(p, 8) for p in B_PROMPTS[:ENGINE_CLIENTS]))  # warm-up
        ctx.decode = timed
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(client(i) for i in range(ENGINE_CLIENTS))))
        wall = time.perf_counter() - started
    finally:
        await engine.close()
    full = [s for n, s in steps if n == ENGINE_CLIENTS]
    return {"step_ms": median(full) * 1000 if full else None, "full_steps": len(full),
            "steps": len(steps), "in_decode": sum(s for _, s in steps) / wall,
            "tok_s": tokens / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--requantize", nargs="*", default=[], choices=("Q8_0", "Q4_0"))
    p.add_argument("--flash-attn", action="store_true", help="as the engine's flash_attn: true")
    p.add_argument("--no-engine", action="store_true", help="the raw API only")
    args = p.parse_args(argv)
    from llama_cpp import _logger

    _logger.set_verbose(False)  # its import puts llama.cpp's log through Python's, quiet here
    with tempfile.TemporaryDirectory(prefix="protege-bench-") as tmp:
        files = {f"{packaged_student().name} (packaged)": str(packaged_student()),
                 **requantized(args.requantize, Path(tmp), print)}
        rows, engine_rows = [], []
        for name, path in files.items():
            rates = [tokens_per_s(path, b, args.threads, args.steps, args.flash_attn)
                     for b in args.batches]
            eight = dict(zip(args.batches, rates))
            rows.append([name, *(fmt_num(r) for r in rates),
                         fmt_ratio(eight.get(8), eight.get(1))])
            if args.no_engine:
                continue
            e = asyncio.run(engine_steps(path, args.threads, args.flash_attn))
            raw_ms = ENGINE_CLIENTS * 1000 / tokens_per_s(path, ENGINE_CLIENTS, args.threads,
                                                          args.steps, args.flash_attn)
            engine_rows.append([name, f"{fmt_num(e['step_ms'])} ({e['full_steps']} of "
                                f"{e['steps']})", fmt_num(raw_ms), fmt_ratio(e["step_ms"], raw_ms),
                                f"{e['in_decode']:.0%}", fmt_num(e["tok_s"])])
    print(f"\nllama.cpp decode, {args.threads} thread(s), flash attention "
          f"{'on' if args.flash_attn else 'off'}, {args.steps} steps, tokens/s\n")
    print(table(["GGUF", *(f"batch {b}" for b in args.batches), "8 vs 1"], rows))
    if engine_rows:
        print(f"\nThe engine's batcher, {ENGINE_CLIENTS} clients x {ENGINE_ROUNDS} greedy answers "
              f"(24-64 tokens): its {ENGINE_CLIENTS}-answer decode steps against the raw API's "
              f"batch-{ENGINE_CLIENTS} step (measured again right after)\n")
        print(table(["GGUF", "engine step ms (steps)", "raw step ms", "engine vs raw",
                     "wall in llama_decode", "clients' tok/s"], engine_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
