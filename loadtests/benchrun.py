"""What each benchmark script does around its measurements: stop cleanly on SIGTERM, log with
the seconds since the start, send a request to its end (`post`), and write the results as JSON
under loadtests/out."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx

OUT_DIR = Path(__file__).resolve().parent / "out"
JSON_HEADERS = {"content-type": "application/json"}


def on_sigterm(_signum, _frame):
    """SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop what the bench started."""
    raise KeyboardInterrupt("SIGTERM")


class BenchRun:
    """One run of a benchmark named `name`; results go to `out` or a timestamped file."""

    def __init__(self, name: str, out: Path | None = None):
        self.started = time.time()
        self.stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started))
        self.out_path = out or OUT_DIR / f"{name}_{self.stamp}.json"
        signal.signal(signal.SIGTERM, on_sigterm)

    def log(self, line: str) -> None:
        print(f"[{time.time() - self.started:6.1f}s] {line}", flush=True)

    def write(self, result: dict[str, Any]) -> int:
        """Write `result` (JSON, anything else as its string) and say where; exit status 0."""
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.out_path.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwrote {self.out_path}")
        return 0


async def post(client: httpx.AsyncClient, url: str, body: bytes, stream: bool) -> bytes:
    """One request to its end (a stream: to [DONE]); the JSON body, or the stream's tail."""
    if not stream:
        r = await client.post(url, content=body, headers=JSON_HEADERS)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        return r.content
    tail = b""
    async with client.stream("POST", url, content=body, headers=JSON_HEADERS) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for chunk in r.aiter_raw():
            tail = (tail + chunk)[-64:]
    if not tail.rstrip().endswith(b"[DONE]"):
        raise RuntimeError(f"stream ended without [DONE]: {tail!r}")
    return tail
