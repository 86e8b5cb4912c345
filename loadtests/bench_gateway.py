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
   overlap and take turns: direct, gateway, direct, gateway, direct (--b-rounds) so drift shows.
   Each request is timed alone; tok/s is reported as the median over requests (robust to other
   workers' bursts), the best request, and the aggregate (sum of tokens / sum of wall time), with
   the CPU the rest of the machine used meanwhile, so disturbed runs can be told apart.

    .venv/bin/python loadtests/bench_gateway.py            # the full run (about 6-8 min, 2 cores)
    .venv/bin/python loadtests/bench_gateway.py --quick    # a smoke run of the script itself

Prints tables on stdout and writes loadtests/out/bench_<timestamp>.json. Every server it starts
is stopped on exit, Ctrl-C and SIGTERM included. The HTTP servers (the Serve proxy) listen on
127.0.0.1 only; Ray's own internal gRPC ports are Ray's (as with `protege serve`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
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

from core.raylocal import arm_token, start_local_ray  # noqa: E402
from loadtests.bench_stats import (  # noqa: E402
    fmt_added_ms,
    fmt_num,
    fmt_ratio,
    percentile,
    proc_stat_cpu,
    summarize,
    table,
    tokens_per_s,
)
from loadtests.benchrun import JSON_HEADERS, BenchRun, on_sigterm, post
from ops.gateway import Gateway, wait_until  # noqa: E402
from serving import protocol, responses  # noqa: E402
from serving.engines import (  # noqa: E402
    GenerationRequest,
    Message,
    SamplingParams,
    build_engine,
    merge_deltas,  # noqa: E402
)
from serving.engines.config import FakeEngine as FakeEngineConfig  # noqa: E402
from serving.engines.config import LlamaCppEngine as LlamaCppEngineConfig  # noqa: E402

NOOP_PREFIX = "/bench-noop"


class BenchGateway(Gateway):
    """`ops.gateway.Gateway` that also reaps the Ray processes its gateway started."""

    def stop(self, timeout_s: float = 90) -> int:
        procs = descendants(self.proc.pid)  # its own Ray, when it started one
        code: list[int] = []
        run_all(lambda: code.append(super(BenchGateway, self).stop(timeout_s)),
                lambda: reap(procs))
        return code[0]


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
    """examples/default.yaml with its student only (the packaged file: not promotable), no
    shadow and no feedback, ingress replicas 1."""
    base = yaml.safe_load((REPO / "examples" / "default.yaml").read_text())
    route = {k: v for k, v in base["routes"]["student"].items() if k != "shadow"}
    variant_name = route["variant"]
    base["variants"] = {variant_name: {**base["variants"][variant_name], "promotable": False}}
    base["routes"] = {B_ROUTE: route}
    base.pop("feedback", None)
    base["server"]["ingress"]["replicas"] = 1
    return base


def b_engine_config(cfg: dict) -> dict:
    (variant,) = cfg["variants"].values()
    return dict(variant["engine"])


def resolve(path: str) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else REPO / p


# -- measurement plumbing -----------------------------------------------------------------------


def _proc_stat(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 on), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


def _process_tree(root: int) -> dict[int, tuple[int, int]]:
    """{pid: (start time, CPU ticks)} of `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (rest := _proc_stat(name)) is not None:
            pid = int(name)
            children.setdefault(int(rest[1]), []).append(pid)
            info[pid] = (int(rest[19]), int(rest[11]) + int(rest[12]))
    out, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in info:
            out[pid] = info[pid]
        stack.extend(children.get(pid, ()))
    return out


def tree_cpu_s(root: int | None = None) -> float:
    """CPU seconds (user + system) of `root` (default: this process) and all its descendants."""
    tree = _process_tree(os.getpid() if root is None else root)
    return sum(cpu for _, cpu in tree.values()) / os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of the processes below `root` (not `root` itself)."""
    return {pid: start for pid, (start, _) in _process_tree(root).items() if pid != root}


def reap(procs: dict[int, int], grace_s: float = 10.0) -> list[int]:
    """SIGKILL those of `procs` (from `descendants`) still alive after `grace_s`; their pids.

    Ray's agents can outlive an interrupted shutdown as orphans; the start time guards against
    a recycled pid.
    """
    def alive() -> list[int]:
        return [pid for pid, start in procs.items()
                if (rest := _proc_stat(pid)) is not None and int(rest[19]) == start
                and rest[0] != b"Z"]

    deadline = time.monotonic() + grace_s
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def system_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    busy, steal = proc_stat_cpu(Path("/proc/stat").read_text())
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, steal / tick


class Meter:
    """Wall time, CPU of our process tree, and the CPU the rest of the machine used meanwhile."""

    def __init__(self) -> None:
        self.ours = tree_cpu_s()
        self.busy, self.steal = system_cpu_s()
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def read(self) -> dict[str, float]:
        wall = self.elapsed()
        ours = tree_cpu_s() - self.ours
        busy, steal = system_cpu_s()
        busy, steal = busy - self.busy, steal - self.steal
        return {"wall_s": wall, "cpu_s": ours,
                "other_cores": max(0.0, busy - ours) / wall if wall > 0 else math.nan,
                "steal_cores": steal / wall if wall > 0 else math.nan}


def run_all(*steps: Callable[[], None]) -> None:
    """Run every cleanup step even when one fails or is interrupted; then raise the first."""
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except BaseException as e:  # noqa: BLE001 - a second Ctrl-C must not skip the rest
            first = first or e
    if first is not None:
        raise first


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
    meter = Meter()
    await drive(one, n, c, latencies, errors)
    m = meter.read()
    out = summarize(latencies, m["wall_s"])
    out.update(m, cpu_ms_per_req=m["cpu_s"] / n * 1000, errors=len(errors),
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

        return await measure(lambda: post(client, url, body, stream), n, c, warmup)


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

    def running() -> bool:
        app = serve.status().applications.get(name)
        return app is not None and app.status.value == "RUNNING"

    wait_until(running, f"Serve app {name} running", timeout_s, 0.5)


def part_a(args, tmp: Path, log: Callable[[str], None]) -> dict:
    arm_token()  # before Ray loads: the bench's Ray and the gateway joining it share the token
    import ray
    from ray import serve

    cfg = a_config()
    engine_cfg = dict(cfg["variants"]["fake-instant"]["engine"])
    body, chunks = asyncio.run(inproc_payloads(engine_cfg))
    cells: list[dict] = []
    log("A: starting a Ray cluster of the bench's own (127.0.0.1)...")
    address, gw, gateway_log_lines = None, None, None
    try:
        start_local_ray(include_dashboard=False, log_to_driver=False, namespace="bench",
                        object_store_memory=256 * 1024 * 1024)  # its token reaches the gateway
        ctx = ray.get_runtime_context()
        signal.signal(signal.SIGTERM, on_sigterm)  # ray.init installed one of its own
        address = ctx.gcs_address
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
        procs: dict[int, int] = {}

        def stop_gateway() -> None:
            if gw is not None:
                log("A: stopping the gateway...")
                gw.stop()

        def stop_ray() -> None:
            procs.update(descendants(os.getpid()))  # the cluster's processes
            if ray.is_initialized():
                with contextlib.suppress(Exception):
                    serve.shutdown()
            ray.shutdown()

        def reap_left() -> None:
            if left := reap(procs):
                log(f"A: killed {len(left)} Ray processes left behind by the shutdown")

        run_all(stop_gateway, stop_ray, reap_left)
    return {"config": cfg, "ray_address": address, "cells": cells,
            "gateway_log_tail_lines": gateway_log_lines,
            "noop_body_bytes": len(body), "noop_stream_chunks": len(chunks)}


def cpu_cells(x: dict) -> list[str]:
    """CPU ms/req and other processes' cores; n/a for cells too short for 10 ms CPU ticks."""
    if x["wall_s"] < 1.0:
        return ["n/a", "n/a"]
    return [fmt_num(x["cpu_ms_per_req"], 2), fmt_num(x["other_cores"], 2)]


def a_tables(a: dict) -> str:
    by = {(x["stream"], x["c"], x["system"]): x for x in a["cells"]}
    rows = []
    for (stream, c, system), x in by.items():
        rows.append([f"{'stream' if stream else 'json'} c={c} {system}",
                     fmt_num(x["p50_ms"], 2), fmt_num(x["p99_ms"], 2), fmt_num(x["mean_ms"], 2),
                     fmt_num(x["rps"], 1), *cpu_cells(x), x["n"], x["errors"]])
    absolute = table(["cell", "p50 ms", "p99 ms", "mean ms", "req/s", "CPU ms/req", "others",
                      "n", "errors"], rows)
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


def b_record(prompt: str, tokens: int, meter: dict, ttft_s: float | None, text: str,
             **extra) -> dict:
    return {"prompt": prompt, "tokens": tokens, "ttft_s": ttft_s, "text": text, **meter, **extra}


async def b_engine_phase(engine_cfg: dict, k: int, max_tokens: int) -> tuple[dict, dict]:
    """LlamaCppEngine in-process; returns the run and the prompt tokens of every prompt."""
    engine = build_engine(LlamaCppEngineConfig(**engine_cfg), resolve)
    await engine.start()
    try:
        tokens = {p: engine.tokenize_request(b_request(p, max_tokens))
                  for p in (B_WARMUP, *B_PROMPTS)}
        [d async for d in engine.generate(b_request(B_WARMUP, max_tokens))]
        reqs = []
        for prompt in b_prompts(k):
            meter = Meter()
            first, deltas = None, []
            async for d in engine.generate(b_request(prompt, max_tokens)):
                if first is None and d.text:
                    first = meter.elapsed()
                deltas.append(d)
            m = merge_deltas(deltas)
            reqs.append(b_record(prompt, m.completion_tokens, meter.read(), first, m.text))
        return {"system": "LlamaCppEngine", "stream": True, "requests": reqs}, tokens
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
        reqs = []
        for prompt in b_prompts(k):
            meter = Meter()
            r = llm.create_completion(tokens[prompt], **sampling)
            reqs.append(b_record(prompt, r["usage"]["completion_tokens"], meter.read(), None,
                                 r["choices"][0]["text"]))
        out = [{"system": "llama.cpp", "stream": False, "requests": reqs}]
        known = {r["prompt"]: r for r in reqs}
        reqs = []
        for prompt in b_prompts(k):
            meter = Meter()
            first, pieces = None, []
            for chunk in llm.create_completion(tokens[prompt], stream=True, **sampling):
                text = chunk["choices"][0]["text"]
                if first is None and text:
                    first = meter.elapsed()
                pieces.append(text)
            m, text = meter.read(), "".join(pieces)
            same = known.get(prompt)
            # The stream has no usage; greedy decoding gives the non-stream answer's tokens.
            n = same["tokens"] if same and same["text"] == text else len(pieces)
            reqs.append(b_record(prompt, n, m, first, text))
        out.append({"system": "llama.cpp", "stream": True, "requests": reqs})
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
                meter = Meter()
                r = client.post(url, content=body(prompt, False), headers=JSON_HEADERS)
                m = meter.read()
                r.raise_for_status()
                j = r.json()
                return b_record(prompt, j["usage"]["completion_tokens"], m, None,
                                j["choices"][0]["message"]["content"])

            def stream(prompt: str) -> dict:
                meter = Meter()
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
                                    first = meter.elapsed()
                                pieces.append(text)
                m = meter.read()
                return b_record(prompt, usage["completion_tokens"], m, first, "".join(pieces),
                                sse_events=events)

            nonstream(B_WARMUP)
            stream(B_WARMUP)
            # What the idle gateway (Ray, Serve, metrics) takes from the cores llama.cpp needs.
            meter = Meter()
            time.sleep(idle_s)
            idle = meter.read()
            idle_cores = idle["cpu_s"] / idle["wall_s"]
            log(f"B: idle gateway uses {idle_cores:.3f} cores "
                f"(others meanwhile: {idle['other_cores']:.2f} cores)")
            for is_stream, fn in ((False, nonstream), (True, stream)):
                out.append({"system": "gateway", "stream": is_stream,
                            "requests": [fn(p) for p in b_prompts(k)],
                            "idle_cores": idle_cores})
        return out
    finally:
        log("B: stopping the gateway...")
        gw.stop()


def b_summary(run: dict) -> dict:
    reqs = run["requests"]
    tokens = sum(r["tokens"] for r in reqs)
    wall = sum(r["wall_s"] for r in reqs)
    cpu = sum(r["cpu_s"] for r in reqs)
    rates = [tokens_per_s(r["tokens"], r["wall_s"]) for r in reqs]
    ttfts = [r["ttft_s"] for r in reqs if r.get("ttft_s") is not None]
    return {
        "tokens": tokens, "wall_s": wall,
        "tok_s": tokens_per_s(tokens, wall),  # aggregate: sum of tokens / sum of wall time
        "median_tok_s": percentile(rates, 50),  # per request, then the median: robust to noise
        "best_tok_s": max(rates),  # the least disturbed request
        "ttft_p50_ms": percentile(ttfts, 50) * 1000 if ttfts else None,
        "cpu_ms_per_token": cpu / tokens * 1000 if tokens else None,
        "our_cores": cpu / wall if wall > 0 else None,
        "other_cores": sum(r["other_cores"] * r["wall_s"] for r in reqs) / wall if wall else None,
        "steal_cores": sum(r["steal_cores"] * r["wall_s"] for r in reqs) / wall if wall else None,
    }


def part_b(args, tmp: Path, log: Callable[[str], None]) -> dict:
    cfg = b_config()
    if args.b_threads:
        (variant,) = cfg["variants"].values()
        variant["engine"]["n_threads"] = args.b_threads
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
        for r in [eng, *b_llama_phase(engine_cfg, tokens, k, max_tokens)]:
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
        r["summary"] = s = b_summary(r)
        log(f"B: phase {r['phase']} {r['system']:14} {'stream' if r['stream'] else 'json':6} "
            f"median {s['median_tok_s']:6.1f} tok/s, aggregate {s['tok_s']:6.1f} tok/s, "
            f"others {s['other_cores']:.2f} cores")
    texts: dict[str, set[str]] = {}
    for r in runs:
        for q in r["requests"]:
            texts.setdefault(q["prompt"], set()).add(q["text"])
    identical = all(len(v) == 1 for v in texts.values())
    return {"config": cfg, "engine": engine_cfg, "requests_per_run": k, "max_tokens": max_tokens,
            "runs": runs, "outputs_identical": identical}


B_RUNS = (("gateway", False), ("gateway", True), ("llama.cpp", False), ("llama.cpp", True),
          ("LlamaCppEngine", True))
B_RATIOS = (
    ("gateway json / llama.cpp json", ("gateway", False), ("llama.cpp", False)),
    ("gateway stream / llama.cpp stream", ("gateway", True), ("llama.cpp", True)),
    ("gateway json / LlamaCppEngine", ("gateway", False), ("LlamaCppEngine", True)),
    ("gateway stream / LlamaCppEngine", ("gateway", True), ("LlamaCppEngine", True)),
    ("LlamaCppEngine / llama.cpp stream", ("LlamaCppEngine", True), ("llama.cpp", True)),
)


def b_tables(b: dict) -> str:
    rows = []
    for r in b["runs"]:
        s = r["summary"]
        rows.append([f"phase {r['phase']} {r['system']} {'stream' if r['stream'] else 'json'}",
                     fmt_num(s["median_tok_s"], 1), fmt_num(s["best_tok_s"], 1),
                     fmt_num(s["tok_s"], 1), fmt_num(s["ttft_p50_ms"], 1), s["tokens"],
                     fmt_num(s["wall_s"], 2), fmt_num(s["cpu_ms_per_token"], 2),
                     fmt_num(s["our_cores"], 2), fmt_num(s["other_cores"], 2),
                     fmt_num(s["steal_cores"], 2)])
    absolute = table(["run", "median tok/s", "best tok/s", "agg tok/s", "TTFT p50 ms", "tokens",
                      "wall s", "CPU ms/tok", "our cores", "others", "steal"], rows)
    idle = [r["idle_cores"] for r in b["runs"] if "idle_cores" in r]
    if idle:
        absolute += ("\n(idle gateway before its measured requests: "
                     + ", ".join(f"{x:.3f}" for x in idle[::2]) + " cores)")

    def values(key: tuple[str, bool], stat: str) -> list[float]:
        return [r["summary"][stat] for r in b["runs"] if (r["system"], r["stream"]) == key]

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    rows = []
    for name, num, den in B_RATIOS:
        rows.append([name, *(fmt_ratio(mean(values(num, st)), mean(values(den, st)))
                             for st in ("median_tok_s", "best_tok_s", "tok_s")),
                     " ".join(fmt_ratio(mean(values(num, "median_tok_s")), x)
                              for x in values(den, "median_tok_s"))])
    ratios = table(["ratio (goal gateway/direct >= 0.90)", "median", "best", "aggregate",
                    "median vs each phase"], rows)
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
    p.add_argument("--b-rounds", type=int, default=2,
                   help="B: gateway phases, each followed by a direct one (direct first)")
    p.add_argument("--b-threads", type=int, default=None,
                   help="B: override the student's n_threads (gateway and direct alike)")
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
        args.b_requests, args.max_tokens, args.idle_s, args.b_rounds = 2, 16, 1.0, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = BenchRun("bench", args.out)
    stamp, log = run.stamp, run.log

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
    result["seconds"] = time.time() - run.started

    print()
    print(f"protege gateway benchmark  ({stamp}, {os.cpu_count()} CPUs, "
          f"load avg before {result['loadavg_before']}, after {result['loadavg_after']}, "
          f"{result['seconds']:.0f} s)")
    if "a" in result:
        print("\nA. Overhead, instant fake engine (16 tokens), chat; latency = whole response "
              "(stream: to [DONE])")
        print("   CPU ms/req: CPU of this process and all its children (client, Ray, gateway) "
              "per request;\n   others: cores busy with processes not ours meanwhile "
              "(other workers)\n")
        print(a_tables(result["a"]))
    if "b" in result:
        b = result["b"]
        print(f"\nB. Student tokens/s (SmolLM2-135M Q4_1, llama.cpp n_threads "
              f"{b['engine'].get('n_threads')}, n_ctx {b['engine']['n_ctx']}, greedy, "
              f"max_tokens {b['max_tokens']}, {b['requests_per_run']} requests per run, c=1)\n")
        print("   median/best: of per-request tok/s; agg: sum of tokens / sum of wall time; "
              "CPU ms/tok and\n   our cores: this process tree; others: cores busy with "
              "processes not ours meanwhile\n")
        print(b_tables(b))
    return run.write(result)


if __name__ == "__main__":
    sys.exit(main())
