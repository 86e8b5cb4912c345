"""llama.cpp's batch API alone, no gateway and no sampling: what one decode step of 1, 8 and 16
sequences costs on this CPU, per GGUF type (not a test).

For the packaged student (SmolLM2-135M Q4_1) and, with --requantize, the same model requantized
by llama.cpp to other types (into a temporary folder): one context of as many sequences, each
prefilled with the same short prompt, then --steps decode steps of one token per sequence.
Prints tokens/s per batch size and type, and each type's batch-8 over batch-1 ratio. Flash
attention is off unless --flash-attn, as in the engine.

    .venv/bin/python loadtests/bench_llama_batch.py --requantize Q8_0 Q4_0
    .venv/bin/python loadtests/bench_llama_batch.py --requantize Q8_0 Q4_0 --flash-attn
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from loadtests.bench_batching import packaged_student, requantized  # noqa: E402
from loadtests.bench_stats import fmt_num, fmt_ratio, table  # noqa: E402

PROMPT = b"Write a short story about a robot who learns to paint."


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--requantize", nargs="*", default=[], choices=("Q8_0", "Q4_0"))
    p.add_argument("--flash-attn", action="store_true", help="as the engine's flash_attn: true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="protege-bench-") as tmp:
        files = {f"{packaged_student().name} (packaged)": str(packaged_student()),
                 **requantized(args.requantize, Path(tmp), print)}
        rows = []
        for name, path in files.items():
            rates = [tokens_per_s(path, b, args.threads, args.steps, args.flash_attn)
                     for b in args.batches]
            eight = dict(zip(args.batches, rates))
            rows.append([name, *(fmt_num(r) for r in rates),
                         fmt_ratio(eight.get(8), eight.get(1))])
    print(f"\nllama.cpp decode, {args.threads} thread(s), flash attention "
          f"{'on' if args.flash_attn else 'off'}, {args.steps} steps, tokens/s\n")
    print(table(["GGUF", *(f"batch {b}" for b in args.batches), "8 vs 1"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
