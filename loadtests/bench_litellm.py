"""protege against the LiteLLM proxy in front of the same instant upstream, side by side in one
run (not a test).

The upstream is `loadtests.mock_upstream` (an OpenAI-compatible server answering 16 words at
once, in a process of its own). Three systems take turns on it, in one order and then the
other (--rounds):
  direct    the client calls the upstream itself: the floor
  protege   `protege serve` (the real CLI, its own Ray) with one `remote` variant on the
            upstream, no shadow, no feedback store, one ingress replica, an API key
  protege-inline  the same gateway, another route whose `remote` variant is served inside
            the ingress (`in_ingress: true`): one process hop fewer
  litellm   the LiteLLM proxy (litellm[proxy]==1.108.7, one uvicorn worker, no database, a
            master key), its model_list one `openai/` model on the upstream; installed into
            loadtests/.litellm-venv on the first run (pip, from PyPI)
Per system: chat completions, non-streamed and streamed (time to `[DONE]`), at concurrency 1
and 16, after a warm-up: p50/p99 latency and requests/s. "added" is a system's p50 minus
direct's p50 from the same round.

    .venv/bin/python loadtests/bench_litellm.py            # the full run (about 8 min, 2 cores)
    .venv/bin/python loadtests/bench_litellm.py --quick    # a smoke run of the script itself

Prints the table and writes loadtests/out/bench_litellm_<timestamp>.json. Every server binds
127.0.0.1 and is stopped on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import yaml  # noqa: E402

from loadtests.bench_gateway import BenchGateway, loadavg, measure  # noqa: E402
from loadtests.bench_stats import fmt_added_ms, fmt_num, fmt_ratio, median, table  # noqa: E402
from loadtests.benchrun import BenchRun, post  # noqa: E402
from ops.gateway import free_port, gateway_env, wait_until  # noqa: E402

LITELLM = "litellm[proxy]==1.108.7"
LITELLM_VENV = REPO / "loadtests" / ".litellm-venv"
SYSTEMS = ("direct", "protege", "protege-inline", "litellm")
PROXIES = SYSTEMS[1:]
MODELS = {"protege-inline": "student-inline"}  # the route a system is asked for; else "student"
KEY = "sk-bench-" + "0" * 48  # both proxies check it (LiteLLM refuses to start without one)
BODY = {"model": "student", "messages": [{"role": "user", "content": "Say something short "
                                                                     "about rivers."}]}


class Server:
    """A server process started from `cmd`, ready once GET `ready_url` answers 200."""

    def __init__(self, cmd: list[str], ready_url: str, log_path: Path, env: dict[str, str],
                 startup_s: float = 180):
        self._log = open(log_path, "wb")
        self.log_path = log_path
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: self._ready(ready_url), f"{cmd[0]} serving", startup_s, 0.5,
                       lambda: log_path.read_text(errors="replace")[-3000:])
        except BaseException:
            self.stop()
            raise

    def _ready(self, url: str) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"exited ({self.proc.returncode}): "
                               f"{self.log_path.read_text(errors='replace')[-3000:]}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self._log.close()


def ensure_litellm(log) -> Path:
    """The `litellm` command of the bench's own venv, installed on first use."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        log(f"installing {LITELLM} into {LITELLM_VENV} (once)...")
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM],
                       check=True)
    return exe


def protege_config(upstream: str) -> dict:
    variant = {"engine": {"engine": "remote", "base_url": upstream, "model": "student"},
               "num_cpus": 0.5, "max_ongoing_requests": 256}
    return {"variants": {"upstream": variant, "inline": {**variant, "in_ingress": True}},
            "routes": {"student": {"variant": "upstream"},
                       "student-inline": {"variant": "inline"}},
            "server": {"ingress": {"replicas": 1, "num_cpus": 0.5,
                                   "max_ongoing_requests": 256}}}


def litellm_config(upstream: str) -> dict:
    return {"model_list": [{"model_name": "student",
                            "litellm_params": {"model": "openai/student", "api_base": upstream,
                                               "api_key": "none"}}],
            "litellm_settings": {"telemetry": False, "set_verbose": False},
            "general_settings": {"master_key": KEY}}


async def cell(base: str, model: str, stream: bool, c: int, n: int, warmup: int) -> dict:
    body = json.dumps({**BODY, "model": model, "stream": stream}).encode()
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(limits=limits, timeout=120, trust_env=False,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        out = await measure(lambda: post(client, url, body, stream), n, c, warmup)
    out.pop("latencies_ms")
    return out


def run_rounds(bases: dict[str, str], args, log) -> list[dict]:
    cells = []
    for rnd in range(args.rounds):
        order = SYSTEMS if rnd % 2 == 0 else tuple(reversed(SYSTEMS))
        for stream in (False, True):
            for c in (1, 16):
                n = args.n1 if c == 1 else args.n16
                for system in order:
                    r = asyncio.run(cell(bases[system], MODELS.get(system, BODY["model"]),
                                         stream, c, n, args.warmup))
                    log(f"round {rnd + 1} {'stream' if stream else 'json'} c={c} {system}: "
                        f"p50 {r['p50_ms']:.2f} ms, {r['rps']:.0f} req/s, {r['errors']} errors")
                    cells.append({"round": rnd + 1, "system": system, "stream": stream, "c": c,
                                  **r})
    return cells


def tables(cells: list[dict]) -> str:
    """Medians over rounds; added p50 = system p50 - direct p50 of the same round."""
    def of(system: str, stream: bool, c: int, key: str) -> list[float]:
        return [x[key] for x in cells if (x["system"], x["stream"], x["c"]) == (system, stream, c)]

    rows = []
    for stream in (False, True):
        for c in (1, 16):
            direct = of("direct", stream, c, "p50_ms")
            added = {s: median([a - d for a, d in zip(of(s, stream, c, "p50_ms"), direct)])
                     for s in PROXIES}
            rps = {s: median(of(s, stream, c, "rps")) for s in PROXIES}
            for system in PROXIES:
                rows.append(["stream" if stream else "json", c, system,
                             fmt_num(median(direct), 2), fmt_added_ms(added[system], 0.0, 2),
                             fmt_ratio(added[system], added["litellm"]),
                             fmt_num(rps[system], 0), fmt_ratio(rps[system], rps["litellm"])])
    return table(["mode", "c", "system", "direct p50 ms", "added p50 ms", "added vs litellm",
                  "req/s", "req/s vs litellm"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds, the order flipped each time")
    p.add_argument("--n1", type=int, default=300, help="requests at concurrency 1")
    p.add_argument("--n16", type=int, default=1600, help="requests at concurrency 16")
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="one round of a few requests")
    p.add_argument("--out", type=Path, default=None, help="the JSON results file")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.n1, args.n16, args.warmup = 1, 20, 64, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = BenchRun("bench_litellm", args.out)
    result: dict = {"started": run.stamp, "args": {k: str(v) for k, v in vars(args).items()},
                    "cpus": os.cpu_count(), "loadavg_before": loadavg(), "litellm": LITELLM}
    litellm = ensure_litellm(run.log)
    servers: list = []
    try:
        with tempfile.TemporaryDirectory(prefix="protege-bench-") as tmp:
            port = free_port()
            upstream = f"http://127.0.0.1:{port}/v1"
            servers.append(Server([sys.executable, "-m", "loadtests.mock_upstream", "--port",
                                   str(port)], upstream + "/models", Path(tmp) / "upstream.log",
                                  gateway_env()))
            run.log("starting protege (remote engine on the upstream)...")
            servers.append(BenchGateway(protege_config(upstream), Path(tmp) / "protege",
                                        env={"PROTEGE_API_KEYS": KEY}, cwd=REPO))
            lport = free_port()
            cfg = Path(tmp) / "litellm.yaml"
            cfg.write_text(yaml.safe_dump(litellm_config(upstream)))
            run.log("starting the LiteLLM proxy...")
            env = {**gateway_env(), "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
            servers.append(Server([str(litellm), "--config", str(cfg), "--host", "127.0.0.1",
                                   "--port", str(lport), "--num_workers", "1"],
                                  f"http://127.0.0.1:{lport}/health/liveliness",
                                  Path(tmp) / "litellm.log", env))
            bases = {"direct": f"http://127.0.0.1:{port}", "protege": servers[1].base,
                     "protege-inline": servers[1].base, "litellm": f"http://127.0.0.1:{lport}"}
            result["cells"] = run_rounds(bases, args, run.log)
    finally:
        for server in reversed(servers):
            server.stop()
    result["loadavg_after"] = loadavg()
    result["seconds"] = time.time() - run.started
    print(f"\nprotege vs {LITELLM} on the same instant upstream (16 words; stream: to [DONE]), "
          f"medians of {args.rounds} rounds, {os.cpu_count()} CPUs, load avg before "
          f"{result['loadavg_before'][0]:.2f}\n")
    print(tables(result["cells"]))
    return run.write(result)


if __name__ == "__main__":
    sys.exit(main())
