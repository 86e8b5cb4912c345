"""The gateway's cost, measured side by side in one run and printed as ratios (not a test).

A. Overhead with an instant fake engine (16 tokens, no delays), chat requests, non-streamed and
   streamed (time to `[DONE]`), at concurrency 1 and 16, for three systems taking turns:
     in-process  the same FakeEngine called directly: parse the JSON body, generate, build the
                 response (or the SSE bytes): the protocol work without HTTP and Ray
     bare proxy  Ray Serve's HTTP proxy in front of a no-op deployment that returns the same
                 bytes the gateway would (JSON, or the same SSE events)
     gateway     `protege serve` (the real CLI) with the fake engine
   All three run while one Ray cluster of the bench's own is up: the gateway joins it
   (RAY_ADDRESS) and the no-op app sits next to it on the same proxy (/bench-noop), so the two
   HTTP systems share the proxy and the idle cost of Ray.
B. Real student throughput: completion tokens / wall time of the packaged SmolLM2 (llama.cpp,
   greedy, fixed prompts) through the gateway (its own Ray, the student only, ingress replicas 1)
   against llama.cpp in-process (`Llama.create_completion` on the same prompt tokens, and our
   `LlamaCppEngine`), with the same n_threads / n_ctx / n_batch. Direct and gateway phases never
   overlap: direct, gateway, direct (more with --b-rounds) so drift shows.

    .venv/bin/python loadtests/bench_gateway.py            # the full run (about 6-8 min, 2 cores)
    .venv/bin/python loadtests/bench_gateway.py --quick    # a smoke run of the script itself

Prints tables on stdout and writes loadtests/out/bench_<timestamp>.json. Every server it starts
is stopped on exit, Ctrl-C and SIGTERM included. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import yaml  # noqa: E402

from loadtests.bench_stats import (  # noqa: E402
    fmt_added_ms,
    fmt_num,
    fmt_ratio,
    percentile,
    ratio,
    summarize,
    table,
    tokens_per_s,
)
from serving import protocol, responses  # noqa: E402
from serving.config import FakeEngine as FakeEngineConfig  # noqa: E402
from serving.config import LlamaCppEngine as LlamaCppEngineConfig  # noqa: E402
from serving.engines import GenerationRequest, Message, SamplingParams, build_engine  # noqa: E402
from serving.engines import merge_deltas  # noqa: E402
from tests.integration.conftest import Gateway  # noqa: E402

OUT_DIR = REPO / "loadtests" / "out"


class BenchGateway(Gateway):
    """The integration tests' Gateway, also stopped when its start is interrupted (Ctrl-C)."""

    def _wait_ready(self, timeout_s: float) -> None:
        try:
            super()._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
NOOP_PREFIX = "/bench-noop"
JSON_HEADERS = {"content-type": "application/json"}

# -- part A: configuration ----------------------------------------------------------------------

A_ROUTE = "fake"
A_PROMPT = "Say something short about rivers and stones."


def a_config() -> dict:
    """examples/fake.yaml cut to its instant variant: 16 tokens, ttft 0, token delay 0."""
    base = yaml.safe_load((REPO / "examples" / "fake.yaml").read_text())
    variant = base["variants"]["fake-instant"]
    assert variant["engine"] == {"engine": "fake", "completion_tokens": 16, "ttft_s": 0,
                                 "token_delay_s": 0}, variant["engine"]
    base["variants"] = {"fake-instant": variant}
    base["routes"] = {A_ROUTE: {"variant": "fake-instant"}}
    return base


def a_body(stream: bool) -> bytes:
    body = {"model": A_ROUTE, "messages": [{"role": "user", "content": A_PROMPT}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


# -- part B: configuration ----------------------------------------------------------------------

B_ROUTE = "student"
B_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works to a ten-year-old, step by step.",
    "Describe a walk through a busy market in the morning.",
    "List ten ideas for a weekend trip and explain each one briefly.",
    "Write a letter to a friend about learning to cook.",
)
B_WARMUP = "Tell me about the sea."


def b_config() -> dict:
    """examples/default.yaml with its student only, ingress replicas 1."""
    base = yaml.safe_load((REPO / "examples" / "default.yaml").read_text())
    route = base["routes"]["student"]
    variant_name = route["variant"]
    base["variants"] = {variant_name: base["variants"][variant_name]}
    base["routes"] = {B_ROUTE: route}
    base["server"]["ingress"]["replicas"] = 1
    return base


def b_engine_config(cfg: dict) -> dict:
    (variant,) = cfg["variants"].values()
    return dict(variant["engine"])


def resolve(path: str) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else REPO / p


# -- measurement plumbing -----------------------------------------------------------------------


def tree_cpu_s(root: int | None = None) -> float:
    """CPU seconds (user + system) of `root` (default: this process) and all its descendants."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    cpu: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2:].split()
        pid = int(name)
        children.setdefault(int(rest[1]), []).append(pid)
        cpu[pid] = int(rest[11]) + int(rest[12])
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0)
        stack.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


async def drive(one: Callable[[], Awaitable[None]], n: int, c: int,
                latencies: list[float], errors: list[str]) -> None:
    """Run `one` `n` times from `c` concurrent workers; latencies in seconds."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            try:
                await one()
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(c)))


async def measure(one: Callable[[], Awaitable[None]], n: int, c: int, warmup: int) -> dict:
    await drive(one, warmup, c, [], [])
    latencies: list[float] = []
    errors: list[str] = []
    cpu0, t0 = tree_cpu_s(), time.perf_counter()
    await drive(one, n, c, latencies, errors)
    wall, cpu = time.perf_counter() - t0, tree_cpu_s() - cpu0
    out = summarize(latencies, wall)
    out.update(wall_s=wall, cpu_ms_per_req=cpu / n * 1000, errors=len(errors),
               first_error=errors[0] if errors else None,
               latencies_ms=[round(x * 1000, 3) for x in latencies])
    return out


# -- part A: the three systems ------------------------------------------------------------------


async def inproc_once(engine, body: bytes, stream: bool) -> bytes:
    """What the gateway does for one request, minus HTTP and Ray."""
    req = protocol.parse_request("chat", body)
    request_id = "chatcmpl-" + uuid.uuid4().hex
    meta = responses.ResponseMeta(id=request_id, created=int(time.time()), model=req.model,
                                  system_fingerprint="fake-instant:fake-1")
    gens = req.to_generation_requests(request_id)
    if not stream:
        choices = [merge_deltas([d async for d in engine.generate(g)]) for g in gens]
        return responses.dumps(responses.chat_completion(meta, choices))

    async def batches():
        async for d in engine.generate(gens[0]):
            yield [(0, d)]

    chunks = [c async for c in responses.sse_stream("chat", meta, batches(), req.n,
                                                    req.include_usage)]
    if not chunks[-1].endswith(responses.DONE):
        raise RuntimeError("in-process stream ended without [DONE]")
    return b"".join(chunks)


async def inproc_payloads(engine_cfg: dict) -> tuple[bytes, list[bytes]]:
    """The bytes the gateway answers with (non-stream body, stream chunks), for the no-op app."""
    engine = build_engine(FakeEngineConfig(**engine_cfg), resolve)
    await engine.start()
    body = await inproc_once(engine, a_body(False), False)
    req = protocol.parse_request("chat", a_body(True))
    meta = responses.ResponseMeta(id="chatcmpl-" + uuid.uuid4().hex, created=int(time.time()),
                                  model=req.model, system_fingerprint="fake-instant:fake-1")
    gens = req.to_generation_requests(meta.id)

    async def batches():
        async for d in engine.generate(gens[0]):
            yield [(0, d)]

    chunks = [c async for c in responses.sse_stream("chat", meta, batches(), 1, False)]
    await engine.close()
    return body, chunks


async def inproc_cell(engine_cfg: dict, stream: bool, n: int, c: int, warmup: int) -> dict:
    engine = build_engine(FakeEngineConfig(**engine_cfg), resolve)
    await engine.start()
    body = a_body(stream)
    try:
        return await measure(lambda: inproc_once(engine, body, stream), n, c, warmup)
    finally:
        await engine.close()


async def http_cell(url: str, body: bytes, stream: bool, n: int, c: int, warmup: int) -> dict:
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(limits=limits, timeout=120, trust_env=False) as client:

        async def post() -> None:
            r = await client.post(url, content=body, headers=JSON_HEADERS)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")

        async def post_stream() -> None:
            tail = b""
            async with client.stream("POST", url, content=body, headers=JSON_HEADERS) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                async for chunk in r.aiter_raw():
                    tail = (tail + chunk)[-64:]
            if not tail.endswith(responses.DONE):
                raise RuntimeError(f"stream ended without [DONE]: {tail!r}")

        return await measure(post_stream if stream else post, n, c, warmup)


def deploy_noop(body: bytes, chunks: list[bytes]) -> None:
    """A no-op Serve app at NOOP_PREFIX on the running proxy: fixed bytes, no protocol work."""
    from ray import serve
    from starlette.responses import Response, StreamingResponse

    @serve.deployment(name="noop", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=256)
    class Noop:
        async def __call__(self, request):
            await request.body()
            if request.url.path.endswith("/stream"):
                async def events():
                    for chunk in chunks:
                        yield chunk

                return StreamingResponse(events(), media_type="text/event-stream")
            return Response(body, media_type="application/json")

    serve.run(Noop.bind(), name="bench-noop", route_prefix=NOOP_PREFIX, blocking=False)
    _wait_app("bench-noop")


def _wait_app(name: str, timeout_s: float = 120) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        if app is not None and app.status.value == "RUNNING":
            return
        time.sleep(0.5)
    raise RuntimeError(f"Serve app {name} not running after {timeout_s}s")


def part_a(args, tmp: Path, log: Callable[[str], None]) -> dict:
    import ray
    from ray import serve

    cfg = a_config()
    engine_cfg = dict(cfg["variants"]["fake-instant"]["engine"])
    body, chunks = asyncio.run(inproc_payloads(engine_cfg))
    cells: list[dict] = []
    log("A: starting a Ray cluster of the bench's own (127.0.0.1)...")
    ctx = ray.init(address="local", include_dashboard=False, log_to_driver=False,
                   namespace="bench", object_store_memory=256 * 1024 * 1024,
                   _node_ip_address="127.0.0.1")
    address = ctx.address_info["gcs_address"]
    gw = None
    try:
        log(f"A: starting the gateway (fake engine), joining {address}...")
        gw = BenchGateway(cfg, tmp, env={"RAY_ADDRESS": address}, startup_s=300)
        log(f"A: gateway up on {gw.base}; deploying the no-op app at {NOOP_PREFIX}...")
        deploy_noop(body, chunks)
        noop = gw.base + NOOP_PREFIX
        gateway_url = gw.base + "/v1/chat/completions"
        for stream in (False, True):
            for c in (1, 16):
                n = args.n1 if c == 1 else args.n16
                warm = args.warmup if c == 1 else max(args.warmup, c * 2)
                for system in ("in-process", "bare proxy", "gateway"):
                    t0 = time.monotonic()
                    if system == "in-process":
                        r = asyncio.run(inproc_cell(engine_cfg, stream, n, c, warm))
                    elif system == "bare proxy":
                        url = noop + ("/stream" if stream else "")
                        r = asyncio.run(http_cell(url, a_body(stream), stream, n, c, warm))
                    else:
                        r = asyncio.run(http_cell(gateway_url, a_body(stream), stream, n, c,
                                                  warm))
                    r.update(system=system, stream=stream, c=c)
                    cells.append(r)
                    log(f"A: {'stream' if stream else 'json':6} c={c:<2} {system:10} "
                        f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                        f"{r['rps']:7.1f} req/s  errors {r['errors']}  "
                        f"({time.monotonic() - t0:.1f} s)")
        gateway_log_lines = len(gw.logs().splitlines())
    finally:
        if gw is not None:
            log("A: stopping the gateway...")
            gw.stop()
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    return {"config": cfg, "ray_address": address, "cells": cells,
            "gateway_log_tail_lines": gateway_log_lines,
            "noop_body_bytes": len(body), "noop_stream_chunks": len(chunks)}


def a_tables(a: dict) -> str:
    by = {(x["stream"], x["c"], x["system"]): x for x in a["cells"]}
    rows = []
    for (stream, c, system), x in by.items():
        rows.append([f"{'stream' if stream else 'json'} c={c} {system}",
                     fmt_num(x["p50_ms"], 2), fmt_num(x["p99_ms"], 2), fmt_num(x["mean_ms"], 2),
                     fmt_num(x["rps"], 1), fmt_num(x["cpu_ms_per_req"], 2), x["n"],
                     x["errors"]])
    absolute = table(["cell", "p50 ms", "p99 ms", "mean ms", "req/s", "CPU ms/req", "n",
                      "errors"], rows)
    rows = []
    for stream in (False, True):
        for c in (1, 16):
            ip, bp, gw = (by.get((stream, c, s)) for s in ("in-process", "bare proxy", "gateway"))
            if not (ip and bp and gw):
                continue
            rows.append([
                f"{'stream' if stream else 'json'} c={c}",
                fmt_added_ms(gw["p50_ms"], ip["p50_ms"]),
                fmt_added_ms(gw["p99_ms"], ip["p99_ms"]),
                fmt_added_ms(bp["p50_ms"], ip["p50_ms"]),
                fmt_ratio(gw["p50_ms"], bp["p50_ms"]),
                fmt_ratio(gw["p99_ms"], bp["p99_ms"]),
                fmt_ratio(gw["rps"], bp["rps"]),
                fmt_ratio(gw["cpu_ms_per_req"], bp["cpu_ms_per_req"]),
            ])
    ratios = table(["cell", "gw-inproc p50", "gw-inproc p99", "bare-inproc p50",
                    "gw/bare p50", "gw/bare p99", "gw/bare req/s", "gw/bare CPU"], rows)
    return absolute + "\n\n" + ratios


# -- part B: tokens/s ---------------------------------------------------------------------------


def b_request(prompt: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id="bench-" + uuid.uuid4().hex,
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        messages=(Message("user", prompt),),
    )


def b_prompts(k: int) -> list[str]:
    return [B_PROMPTS[i % len(B_PROMPTS)] for i in range(k)]


async def b_engine_phase(engine_cfg: dict, k: int, max_tokens: int) -> tuple[dict, dict]:
    """LlamaCppEngine in-process; returns the run and the prompt tokens of every prompt."""
    engine = build_engine(LlamaCppEngineConfig(**engine_cfg), resolve)
    await engine.start()
    try:
        tokens = {p: engine.tokenize_request(b_request(p, max_tokens))
                  for p in (B_WARMUP, *B_PROMPTS)}
        [d async for d in engine.generate(b_request(B_WARMUP, max_tokens))]
        reqs = []
        cpu0 = tree_cpu_s()
        for prompt in b_prompts(k):
            t0 = time.perf_counter()
            first = None
            deltas = []
            async for d in engine.generate(b_request(prompt, max_tokens)):
                if first is None and d.text:
                    first = time.perf_counter() - t0
                deltas.append(d)
            wall = time.perf_counter() - t0
            m = merge_deltas(deltas)
            reqs.append({"prompt": prompt, "tokens": m.completion_tokens, "wall_s": wall,
                         "ttft_s": first, "text": m.text})
        return {"system": "engine in-process", "requests": reqs,
                "cpu_s": tree_cpu_s() - cpu0}, tokens
    finally:
        await engine.close()


def b_llama_phase(engine_cfg: dict, tokens: dict, k: int, max_tokens: int) -> list[dict]:
    """llama_cpp.Llama.create_completion on the same prompt tokens: non-stream, then stream."""
    from llama_cpp import Llama

    threads = engine_cfg.get("n_threads") or len(os.sched_getaffinity(0))
    llm = Llama(model_path=str(resolve(engine_cfg["path"])), n_ctx=engine_cfg["n_ctx"],
                n_threads=threads, n_threads_batch=threads,
                n_batch=engine_cfg.get("n_batch", 512),
                n_gpu_layers=engine_cfg.get("n_gpu_layers", 0), verbose=False)
    sampling = dict(max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                    typical_p=1.0, repeat_penalty=1.0)
    try:
        llm.create_completion(tokens[B_WARMUP], **sampling)
        out = []
        reqs = []
        cpu0 = tree_cpu_s()
        for prompt in b_prompts(k):
            t0 = time.perf_counter()
            r = llm.create_completion(tokens[prompt], **sampling)
            wall = time.perf_counter() - t0
            reqs.append({"prompt": prompt, "tokens": r["usage"]["completion_tokens"],
                         "wall_s": wall, "ttft_s": None, "text": r["choices"][0]["text"]})
        out.append({"system": "llama.cpp direct", "stream": False, "requests": reqs,
                    "cpu_s": tree_cpu_s() - cpu0})
        known = {r["prompt"]: r for r in reqs}
        reqs = []
        cpu0 = tree_cpu_s()
        for prompt in b_prompts(k):
            t0 = time.perf_counter()
            first, pieces = None, []
            for chunk in llm.create_completion(tokens[prompt], stream=True, **sampling):
                text = chunk["choices"][0]["text"]
                if first is None and text:
                    first = time.perf_counter() - t0
                pieces.append(text)
            wall = time.perf_counter() - t0
            text = "".join(pieces)
            same = known.get(prompt)
            # The stream has no usage; greedy decoding gives the non-stream answer's tokens.
            n = same["tokens"] if same and same["text"] == text else len(pieces)
            reqs.append({"prompt": prompt, "tokens": n, "wall_s": wall, "ttft_s": first,
                         "text": text})
        out.append({"system": "llama.cpp direct", "stream": True, "requests": reqs,
                    "cpu_s": tree_cpu_s() - cpu0})
        return out
    finally:
        llm.close()


def b_gateway_phase(cfg: dict, tmp: Path, k: int, max_tokens: int, idle_s: float,
                    log: Callable[[str], None]) -> list[dict]:
    gw = BenchGateway(cfg, tmp, startup_s=300)
    try:
        log(f"B: gateway up on {gw.base}")
        url = gw.base + "/v1/chat/completions"
        out = []
        with httpx.Client(timeout=600, trust_env=False) as client:

            def body(prompt: str, stream: bool) -> bytes:
                b = {"model": B_ROUTE, "messages": [{"role": "user", "content": prompt}],
                     "max_tokens": max_tokens, "temperature": 0}
                if stream:
                    b.update(stream=True, stream_options={"include_usage": True})
                return json.dumps(b).encode()

            def nonstream(prompt: str) -> dict:
                t0 = time.perf_counter()
                r = client.post(url, content=body(prompt, False), headers=JSON_HEADERS)
                wall = time.perf_counter() - t0
                r.raise_for_status()
                j = r.json()
                return {"prompt": prompt, "tokens": j["usage"]["completion_tokens"],
                        "wall_s": wall, "ttft_s": None,
                        "text": j["choices"][0]["message"]["content"]}

            def stream(prompt: str) -> dict:
                t0 = time.perf_counter()
                first, pieces, usage, events = None, [], None, 0
                with client.stream("POST", url, content=body(prompt, True),
                                   headers=JSON_HEADERS) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        events += 1
                        j = json.loads(line[6:])
                        if j.get("usage"):
                            usage = j["usage"]
                        for ch in j["choices"]:
                            text = ch["delta"].get("content")
                            if text:
                                if first is None:
                                    first = time.perf_counter() - t0
                                pieces.append(text)
                wall = time.perf_counter() - t0
                return {"prompt": prompt, "tokens": usage["completion_tokens"], "wall_s": wall,
                        "ttft_s": first, "text": "".join(pieces), "sse_events": events}

            nonstream(B_WARMUP)
            stream(B_WARMUP)
            # What the idle gateway (Ray, Serve, metrics) takes from the cores llama.cpp needs.
            cpu0, t0 = tree_cpu_s(), time.perf_counter()
            time.sleep(idle_s)
            idle_cores = (tree_cpu_s() - cpu0) / (time.perf_counter() - t0)
            log(f"B: idle gateway uses {idle_cores:.3f} cores")
            for is_stream, fn in ((False, nonstream), (True, stream)):
                cpu0 = tree_cpu_s()
                reqs = [fn(p) for p in b_prompts(k)]
                out.append({"system": "gateway", "stream": is_stream, "requests": reqs,
                            "cpu_s": tree_cpu_s() - cpu0, "idle_cores": idle_cores})
        return out
    finally:
        log("B: stopping the gateway...")
        gw.stop()


def b_summary(run: dict) -> dict:
    reqs = run["requests"]
    tokens = sum(r["tokens"] for r in reqs)
    wall = sum(r["wall_s"] for r in reqs)
    ttfts = [r["ttft_s"] for r in reqs if r.get("ttft_s") is not None]
    return {
        "tokens": tokens, "wall_s": wall, "tok_s": tokens_per_s(tokens, wall),
        "median_req_tok_s": percentile([tokens_per_s(r["tokens"], r["wall_s"]) for r in reqs],
                                       50),
        "ttft_p50_ms": percentile(ttfts, 50) * 1000 if ttfts else None,
        "cpu_ms_per_token": run["cpu_s"] / tokens * 1000 if tokens else None,
        "cores_busy": run["cpu_s"] / wall if wall > 0 else None,
    }


def part_b(args, tmp: Path, log: Callable[[str], None]) -> dict:
    cfg = b_config()
    engine_cfg = b_engine_config(cfg)
    k, max_tokens = args.b_requests, args.max_tokens
    runs: list[dict] = []
    tokens: dict = {}
    phase = 0

    def direct() -> None:
        nonlocal tokens, phase
        phase += 1
        log(f"B: phase {phase}: direct (LlamaCppEngine, then llama_cpp.Llama), no servers up")
        t0 = time.monotonic()
        eng, tokens = asyncio.run(b_engine_phase(engine_cfg, k, max_tokens))
        eng.update(stream=True, phase=phase)
        runs.append(eng)
        for r in b_llama_phase(engine_cfg, tokens, k, max_tokens):
            r["phase"] = phase
            runs.append(r)
        log(f"B: phase {phase}: done in {time.monotonic() - t0:.1f} s")

    def gateway() -> None:
        nonlocal phase
        phase += 1
        log(f"B: phase {phase}: gateway (student only, its own Ray)")
        t0 = time.monotonic()
        (tmp / f"b{phase}").mkdir()
        for r in b_gateway_phase(cfg, tmp / f"b{phase}", k, max_tokens, args.idle_s, log):
            r["phase"] = phase
            runs.append(r)
        log(f"B: phase {phase}: done in {time.monotonic() - t0:.1f} s")

    direct()
    for _ in range(args.b_rounds):
        gateway()
        direct()
    for r in runs:
        r["summary"] = b_summary(r)
        log(f"B: phase {r['phase']} {r['system']:18} {'stream' if r['stream'] else 'json':6} "
            f"{r['summary']['tok_s']:6.1f} tok/s")
    texts = {}
    for r in runs:
        for q in r["requests"]:
            texts.setdefault(q["prompt"], set()).add(q["text"])
    identical = all(len(v) == 1 for v in texts.values())
    return {"config": cfg, "engine": engine_cfg, "requests_per_run": k, "max_tokens": max_tokens,
            "runs": runs, "outputs_identical": identical}


def b_tables(b: dict) -> str:
    rows = []
    for r in b["runs"]:
        s = r["summary"]
        rows.append([f"phase {r['phase']} {r['system']} {'stream' if r['stream'] else 'json'}",
                     fmt_num(s["tok_s"], 1), fmt_num(s["median_req_tok_s"], 1),
                     fmt_num(s["ttft_p50_ms"], 1), s["tokens"], fmt_num(s["wall_s"], 2),
                     fmt_num(s["cpu_ms_per_token"], 2), fmt_num(s["cores_busy"], 2)])
    absolute = table(["run", "tok/s", "median req tok/s", "TTFT p50 ms", "tokens", "wall s",
                      "CPU ms/token", "cores busy"], rows)
    idle = [r["idle_cores"] for r in b["runs"] if "idle_cores" in r]
    if idle:
        absolute += ("\n(idle gateway, before its measured requests: "
                     + ", ".join(f"{x:.3f}" for x in idle[::2]) + " cores busy)")

    def tok_s(system: str, stream: bool) -> list[float]:
        return [r["summary"]["tok_s"] for r in b["runs"]
                if r["system"] == system and r["stream"] == stream]

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    gw_json, gw_stream = mean(tok_s("gateway", False)), mean(tok_s("gateway", True))
    ll_json, ll_stream = tok_s("llama.cpp direct", False), tok_s("llama.cpp direct", True)
    eng = tok_s("engine in-process", True)
    rows = [
        ["gateway json / llama.cpp json", fmt_ratio(gw_json, mean(ll_json)),
         " ".join(fmt_ratio(gw_json, x) for x in ll_json)],
        ["gateway stream / llama.cpp stream", fmt_ratio(gw_stream, mean(ll_stream)),
         " ".join(fmt_ratio(gw_stream, x) for x in ll_stream)],
        ["gateway stream / LlamaCppEngine", fmt_ratio(gw_stream, mean(eng)),
         " ".join(fmt_ratio(gw_stream, x) for x in eng)],
        ["gateway json / LlamaCppEngine", fmt_ratio(gw_json, mean(eng)),
         " ".join(fmt_ratio(gw_json, x) for x in eng)],
        ["LlamaCppEngine / llama.cpp stream", fmt_ratio(mean(eng), mean(ll_stream)),
         " ".join(fmt_ratio(a, x) for a, x in zip(eng, ll_stream))],
    ]
    ratios = table(["ratio (goal gateway/direct >= 0.90)", "vs mean of direct",
                    "vs each direct phase"], rows)
    return (absolute + "\n\n" + ratios +
            f"\n\noutputs identical across all runs (greedy): {b['outputs_identical']}")


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n1", type=int, default=200, help="A: measured requests per cell at c=1")
    p.add_argument("--n16", type=int, default=800, help="A: measured requests per cell at c=16")
    p.add_argument("--warmup", type=int, default=20, help="A: warm-up requests per cell "
                   "(at c=16 at least 2 per connection)")
    p.add_argument("--b-requests", type=int, default=5, help="B: measured requests per run")
    p.add_argument("--b-rounds", type=int, default=1,
                   help="B: gateway phases, each followed by a direct one (direct first)")
    p.add_argument("--max-tokens", type=int, default=128, help="B: max_tokens per request")
    p.add_argument("--idle-s", type=float, default=5.0,
                   help="B: seconds the idle gateway's CPU use is measured over")
    p.add_argument("--skip-a", action="store_true", help="skip part A (overhead)")
    p.add_argument("--skip-b", action="store_true", help="skip part B (student tokens/s)")
    p.add_argument("--quick", action="store_true",
                   help="tiny counts: checks the script works, measures nothing useful")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: "
                   "loadtests/out/bench_<timestamp>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.n1, args.n16, args.warmup = 10, 32, 2
        args.b_requests, args.max_tokens, args.idle_s = 2, 16, 1.0
    return args


def _on_sigterm(_signum, _frame):
    raise KeyboardInterrupt("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    out_path = args.out or OUT_DIR / f"bench_{stamp}.json"

    def log(line: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {line}", flush=True)

    result: dict = {
        "started": stamp, "argv": sys.argv[1:], "args": {k: str(v) for k, v in
                                                          vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "python": platform.python_version()},
        "loadavg_before": loadavg(),
    }
    log(f"load average before: {result['loadavg_before']}")
    with tempfile.TemporaryDirectory(prefix="protege-bench-") as tmp:
        if not args.skip_a:
            (Path(tmp) / "a").mkdir()
            result["a"] = part_a(args, Path(tmp) / "a", log)
        if not args.skip_b:
            result["b"] = part_b(args, Path(tmp), log)
    result["loadavg_after"] = loadavg()
    result["seconds"] = time.time() - started

    print()
    print(f"protege gateway benchmark  ({stamp}, {os.cpu_count()} CPUs, "
          f"load avg before {result['loadavg_before']}, after {result['loadavg_after']}, "
          f"{result['seconds']:.0f} s)")
    if "a" in result:
        print("\nA. Overhead, instant fake engine (16 tokens), chat; latency = whole response "
              "(stream: to [DONE])")
        print("   CPU ms/req: CPU of this process and all its children (client, Ray, gateway) "
              "per request\n")
        print(a_tables(result["a"]))
    if "b" in result:
        b = result["b"]
        print(f"\nB. Student tokens/s (SmolLM2-135M Q4_1, llama.cpp n_threads "
              f"{b['engine'].get('n_threads')}, n_ctx {b['engine']['n_ctx']}, greedy, "
              f"max_tokens {b['max_tokens']}, {b['requests_per_run']} requests per run, c=1)\n")
        print(b_tables(b))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
