"""Instruments for the engines whose token loop runs on one worker thread
(`serving.engines.threaded`): tests of llama.cpp and transformers share them."""

from __future__ import annotations

import asyncio
import threading

from serving.engines import merge_deltas


def count_decodes(engine, monkeypatch, n):
    """Instrument `engine`: the most `_decode` calls (token loops) running at once, and the
    order of submissions to the worker and finished generations. The first token loop waits
    (bounded) until all `n` generations are submitted, so a worker that ran two at once would
    show it; a lock under the count keeps such a broken worker from sharing the model."""
    events, inside, most = [], [0], [0]
    count, model, all_in = threading.Lock(), threading.Lock(), threading.Event()
    decode, submit = engine._decode, engine._pool.submit

    def counted(*args):
        with count:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            all_in.wait(30)
            with model:
                return decode(*args)
        finally:
            with count:
                inside[0] -= 1

    def spied(*args, **kw):
        events.append("submit")
        if events.count("submit") == n:
            all_in.set()
        return submit(*args, **kw)

    monkeypatch.setattr(engine, "_decode", counted)
    monkeypatch.setattr(engine._pool, "submit", spied)
    return events, most


async def run_together(engine, monkeypatch, requests) -> tuple[list, list[str], int]:
    """Send `requests` at once through the instrumented `engine`: each one's merged output, the
    order of submissions and finishes, and the most token loops that ran at once."""
    events, most = count_decodes(engine, monkeypatch, len(requests))

    async def one(request):
        deltas = [d async for d in engine.generate(request)]
        events.append("finish")
        return merge_deltas(deltas)

    outs = await asyncio.gather(*(one(r) for r in requests))
    return outs, events, most[0]
