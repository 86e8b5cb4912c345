"""`LoopMail`: deltas from a model's thread reach their queues in order, one wake-up a burst."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.engines.threaded import LoopMail


def test_a_burst_from_another_thread_wakes_the_loop_once():
    loop = asyncio.new_event_loop()
    wakeups = []
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counted(callback, *args, **kwargs):
        wakeups.append(callback)
        return call_soon_threadsafe(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counted
    mail = LoopMail(loop)
    queues = [asyncio.Queue() for _ in range(3)]

    def drained() -> list[list[object]]:
        async def drain():
            return [[q.get_nowait() for _ in range(q.qsize())] for q in queues]
        return loop.run_until_complete(drain())

    try:
        producer = threading.Thread(target=lambda: [mail.put(queues[i % 3], i)
                                                    for i in range(30)])
        producer.start()
        producer.join()  # the loop was not running: all 30 are one burst
        assert drained() == [list(range(k, 30, 3)) for k in range(3)]
        assert len(wakeups) == 1
        mail.put(queues[0], "next")  # after a delivery, the next item wakes the loop again
        assert drained() == [["next"], [], []]
        assert len(wakeups) == 2
    finally:
        loop.close()
    with pytest.raises(RuntimeError):  # nobody listens: the engine stops the generation
        mail.put(queues[0], "late")
