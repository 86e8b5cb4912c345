"""The load test itself: `loadtests/run_locust.py` against a real gateway, and the locust users'
failure rules against a small SSE server on 127.0.0.1 that breaks the protocol on purpose.

Locust runs in subprocesses only: importing it monkey-patches this process (gevent).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadtests.run_locust import local_host, ratio_table, read_stats, split_route, summary
from ops.gateway import gateway_env
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration

LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + json.dumps({**CHUNK, "choices": [choice]}).encode() + b"\n\n"


GOOD = (_chunk({"role": "assistant", "content": ""}) + _chunk({"content": "Hello"})
        + _chunk({"content": " there"}) + _chunk({}, "stop"))
STREAMS = {
    "good": GOOD + b"data: [DONE]\n\n",
    "no-done": GOOD,                                                # ends without [DONE]
    "bad-json": _chunk({"content": "Hi"}) + b"data: {not json\n\n" + b"data: [DONE]\n\n",
    "error-event": _chunk({"content": "Hi"})
    + b'data: {"error": {"message": "boom", "type": "server_error"}}\n\n' + b"data: [DONE]\n\n",
    "after-done": GOOD + b"data: [DONE]\n\n" + _chunk({"content": "late"}),
}

ANSWER = json.dumps({**CHUNK, "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "Hello"},
     "finish_reason": "stop"}]}).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        route = body["model"]
        if not body.get("stream") and route in ("good", "bad-json"):  # 200, with or without JSON
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(ANSWER if route == "good" else b"{not json")
            return
        if route == "status-500" or not body.get("stream"):
            self.send_response(500)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "no", "type": "server_error"}}')
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        self.wfile.write(STREAMS[route])

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def broken_sse_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _locust(host: str, prefix: Path, env: dict[str, str], seconds: int = 4,
            users: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "locust", "--headless", "-f", str(LOCUSTFILE), "--host", host,
           "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--csv", str(prefix),
           "--only-summary"]
    return subprocess.run(cmd, cwd=REPO, env=gateway_env(env), capture_output=True, text=True,
                          check=False, timeout=60)


def test_stream_failures_are_counted(broken_sse_server, tmp_path):
    routes = ["good", *(r for r in STREAMS if r != "good"), "status-500"]
    env = {"LOADTEST_ROUTES": ",".join(routes), "LOADTEST_WAIT_S": "0.02",
           "LOADTEST_MAX_REQUESTS": "600"}
    proc = _locust(broken_sse_server, tmp_path / "bad", env)
    assert proc.returncode == 1, proc.stderr[-3000:]  # locust's status when requests failed
    rows = {r["name"]: r for r in read_stats((tmp_path / "bad_stats.csv").read_text())}
    good = rows["chat stream [good]"]
    assert good["requests"] > 0 and good["failures"] == 0, rows
    assert rows["chat stream TTFT [good]"]["requests"] == good["requests"]
    assert rows["chat non-stream [good]"]["requests"] > 0
    assert rows["chat non-stream [good]"]["failures"] == 0, rows
    for route in ("bad-json", "status-500"):  # 200 without JSON; 500
        row = rows[f"chat non-stream [{route}]"]
        assert row["requests"] > 0 and row["failures"] == row["requests"], (route, rows)
    for route in routes[1:]:
        row = rows[f"chat stream [{route}]"]
        assert row["requests"] > 0 and row["failures"] == row["requests"], (route, rows)
        assert f"chat stream TTFT [{route}]" not in rows  # TTFT only for streams that succeeded
    failures = (tmp_path / "bad_failures.csv").read_text()
    for reason in ("ended without [DONE]", "is not JSON", "error event", "data after [DONE]",
                   "status 500", "no choices in the answer"):
        assert reason in failures, failures


def test_run_stops_after_max_requests(broken_sse_server, tmp_path):
    env = {"LOADTEST_ROUTES": "good", "LOADTEST_CHAT_WEIGHT": "0", "LOADTEST_MAX_REQUESTS": "6"}
    t0 = time.monotonic()
    proc = _locust(broken_sse_server, tmp_path / "few", env, seconds=40)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 30  # stopped by the count, not by -t 40s
    assert "LOADTEST_MAX_REQUESTS=6 reached" in proc.stderr
    rows = read_stats((tmp_path / "few_stats.csv").read_text())
    sent = sum(r["requests"] for r in rows if r["type"] == "POST")
    assert 0 < sent <= 6, rows


@pytest.mark.parametrize("host", ["http://192.0.2.1:8000", "http://127.0.0.1.example.com",
                                  "ftp://127.0.0.1:21", ""])
def test_locust_refuses_other_hosts(host, tmp_path):
    cmd = [sys.executable, "-m", "locust", "--headless", "-f", str(LOCUSTFILE), "-u", "1",
           "-t", "3s", "--csv", str(tmp_path / "x"), *(["--host", host] if host else [])]
    proc = subprocess.run(cmd, cwd=REPO, env=gateway_env({}), capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode != 0
    assert "refusing host" in proc.stderr or "no host" in proc.stderr, proc.stderr[-2000:]
    assert "Run time limit" not in proc.stderr  # stopped before the run started
    with pytest.raises(SystemExit):
        local_host(host or "http://10.0.0.1")


def test_summary_helpers():
    assert split_route("chat stream TTFT [plain]") == ("chat stream TTFT", "plain")
    assert split_route("Aggregated") == ("Aggregated", None)
    assert local_host("http://localhost:8000/") == "http://localhost:8000"
    header = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
              "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,"
              "50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%\n")
    line = "{t},{n},10,0,{p},1,1,1,1,{r},0,{p},1,1,1,1,{p},1,{p},1,1,1\n"
    csv_text = header + "".join(line.format(t=t, n=n, p=p, r=r) for t, n, p, r in [
        ("POST", "chat stream [shadowed]", 120, 5), ("POST", "chat stream [plain]", 100, 4),
        ("", "Aggregated", 110, 9)])
    rows = read_stats(csv_text)
    assert [r["requests"] for r in rows] == [10, 10, 10]
    ratios = ratio_table(rows)
    assert "chat stream" in ratios and "1.20x" in ratios and "1.25x" in ratios
    text = summary(rows, {"mirrored shadowed sent": 10.0}, "head")
    assert text.index("[plain]") < text.index("[shadowed]") < text.index("Aggregated")
    assert "mirrored shadowed sent: 10" in text


def test_run_locust_against_the_gateway(tmp_path):
    """`make loadtest` in small: the runner starts the gateway, runs locust, stops it."""
    out = tmp_path / "out"
    env = gateway_env({"LOADTEST_MAX_REQUESTS": "2000"})
    env.pop("PROTEGE_API_KEYS", None)
    proc = subprocess.run(
        [sys.executable, "loadtests/run_locust.py", "-u", "4", "-r", "4", "-t", "8s",
         "--out-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (stats,) = out.glob("locust_*_stats.csv")
    (summary_file,) = out.glob("locust_*_summary.txt")
    rows = {r["name"]: r for r in read_stats(stats.read_text())}
    for route in ("shadowed", "plain"):
        chat = rows[f"chat non-stream [{route}]"]
        stream = rows[f"chat stream [{route}]"]
        ttft = rows[f"chat stream TTFT [{route}]"]
        for row in (chat, stream, ttft):
            assert row["requests"] > 0 and row["failures"] == 0, rows
        assert ttft["requests"] == stream["requests"]
        # The stream row times the whole stream (16 tokens, 5 ms apart after the first), not
        # just the headers: its median is above time to first token.
        assert stream["median"] >= ttft["median"], (stream, ttft)
    text = summary_file.read_text()
    assert "shadowed / plain" in text and "mirrored shadowed sent" in text, text
    assert "mirrored plain" not in text
    assert text in proc.stdout
