"""A real Prometheus scraping a running gateway and the loop's metrics file: the counts it
stores are the traffic that was sent, and every dashboard query in ops/dashboards returns data.

The gateway runs fake engines (two ingress replicas, a two-replica arm, a fake teacher on the
shadow, feedback declared) and one promotable llama.cpp variant serving the packaged student
from a registry version with a fidelity score. The loop's state is written with
`distill.loop.loop_metrics` to a textfile served over HTTP, as a node_exporter textfile
collector would expose it.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from prometheus_client import write_to_textfile

from distill.loop import loop_metrics
from distill.registry import Registry
from ops.gateway import Gateway, wait_until
from tests.integration.conftest import API_KEY, REPO
from tests.promserver import dashboard_queries, prometheus, promql

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

STUDENT = REPO / "models" / "student" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MSG = [{"role": "user", "content": "hi"}]
N_PLAIN, N_STREAM, N_MISSING = 6, 4, 3
LAST_RUN = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
LOOP_RUNS = {"promoted": 2, "registered": 1, "rejected": 3, "failed": 1}
LOOP_STAGES = {("export", "completed"): 7, ("distill", "completed"): 6,
               ("distill", "failed"): 1, ("validate", "completed"): 6,
               ("register", "completed"): 3, ("promote", "completed"): 2}


def config(tmp) -> dict:
    fake = {"engine": "fake", "completion_tokens": 8}
    return {
        "server": {"ingress": {"replicas": 2, "num_cpus": 0}, "request_timeout_s": 30},
        "shadow": {"store_path": str(tmp / "pairs.sqlite"), "spill_dir": str(tmp / "spill"),
                   "timeout_s": 10, "semantic_model": None, "max_in_flight": 100,
                   "max_pending": 100},
        "registry": {"root": str(tmp / "registry"), "poll_s": 1},
        "feedback": {"thumbs_up": {"type": "boolean"},
                     "rating": {"type": "float", "min": 1, "max": 5}},
        "variants": {
            "student": {"engine": fake, "version": "s1", "replicas": 2, "num_cpus": 0},
            "student-b": {"engine": fake, "version": "b1", "num_cpus": 0},
            "teacher": {"engine": {"engine": "fake", "completion_tokens": 10}, "version": "t1",
                        "num_cpus": 0},
            "smol": {"engine": {"engine": "llamacpp", "path": str(STUDENT), "n_ctx": 256,
                                "n_threads": 1},
                     "version": "base", "promotable": True, "num_cpus": 0},
        },
        "routes": {
            "chat": {"variant": "student", "sticky_key": "request",
                     "arms": [{"variant": "student", "weight": 1},
                              {"variant": "student-b", "weight": 1}],
                     "shadow": {"variant": "teacher", "sample_rate": 1}},
            "smol": {"variant": "smol"},
        },
    }


def loop_state() -> dict:
    def key(name, **labels):
        return json.dumps([name, sorted(labels.items())])

    counters = {key("protege_loop_runs_total", outcome=o): n for o, n in LOOP_RUNS.items()}
    counters.update({key("protege_loop_stages_total", stage=s, outcome=o): n
                     for (s, o), n in LOOP_STAGES.items()})
    return {"counters": counters, "last_attempt": {"run": "r7", "outcome": "promoted",
                                                   "at": LAST_RUN.isoformat()}}


@pytest.fixture(scope="module")
def loop_target(tmp_path_factory):
    """The loop's metrics.prom, served like a textfile collector's page."""
    folder = tmp_path_factory.mktemp("loop")
    write_to_textfile(str(folder / "metrics"), loop_metrics(loop_state()))

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, loop_target):
    if not STUDENT.exists():
        pytest.fail(f"{STUDENT} is missing: run `make models` (make test does it)")
    tmp = tmp_path_factory.mktemp("prom")
    registry = Registry(tmp / "registry")
    artifact = tmp / "artifact"
    artifact.mkdir()
    shutil.copy(STUDENT, artifact / "student.gguf")
    registry.register(artifact, entry="student.gguf", teacher={"name": "qwen"},
                      gate={"passed": True, "failures": []}, fidelity={"score": 0.6})
    registry.promote("smol", "v1")
    gw = Gateway(config(tmp), tmp, env={"PROTEGE_API_KEYS": API_KEY})
    try:
        scrape = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [
                      {"job_name": "protege", "static_configs": [
                          {"targets": [gw.base.removeprefix("http://")]}]},
                      {"job_name": "protege-loop", "static_configs": [
                          {"targets": [loop_target]}]}]}
        with prometheus(scrape, tmp / "prometheus") as prom:
            yield gw, prom, send_traffic(gw)
    finally:
        gw.stop()


def send_traffic(gw) -> dict:
    """Known traffic through the official client; what each arm answered."""
    client = gw.client(timeout=30)
    answered: dict[str, list[str]] = {"student": [], "student-b": []}
    for i in range(N_PLAIN):
        content = "mail me at ann@example.com" if i == 0 else "hi"
        r = client.chat.completions.create(model="chat", seed=i,
                                           messages=[{"role": "user", "content": content}])
        answered[r.system_fingerprint.split(":")[0]].append(r.id)
    for i in range(N_STREAM):
        chunks = list(client.chat.completions.create(model="chat", messages=MSG, seed=100 + i,
                                                     stream=True))
        answered[chunks[0].system_fingerprint.split(":")[0]].append(chunks[0].id)
    for _ in range(N_MISSING):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-route", messages=MSG)
    with gw.http() as http:
        for variant, ids in answered.items():
            for rid in ids:
                r = http.post("/v1/feedback", json={"response_id": rid, "metric": "thumbs_up",
                                                    "value": variant == "student"})
                assert r.status_code == 200, r.text
        for rid in answered["student-b"][:1]:
            r = http.post("/v1/feedback", json={"response_id": rid, "metric": "rating",
                                                "value": 4})
            assert r.status_code == 200, r.text
    return {v: len(ids) for v, ids in answered.items()}


def test_prometheus_counts_what_was_sent(stack):
    _, prom, by_arm = stack
    prom.wait_for('sum(up{job=~"protege|protege-loop"})', 2)
    sent = N_PLAIN + N_STREAM
    assert sum(by_arm.values()) == sent
    prom.wait_for('sum(protege_requests_total{route="chat",status="200"})', sent)
    for variant, n in by_arm.items():
        if n:
            prom.wait_for(f'sum(protege_requests_total{{route="chat",variant="{variant}",'
                          f'status="200"}})', n)
    prom.wait_for('sum(protege_requests_total{status="404"})', N_MISSING)
    prom.wait_for('sum(protege_rejections_total{reason="404"})', N_MISSING)
    prom.wait_for('sum(protege_request_duration_seconds_count{route="chat"})', sent)
    prom.wait_for('sum(protege_time_to_first_token_seconds_count{route="chat",stream="true"})',
                  N_STREAM)
    prom.wait_for('sum(protege_tokens_total{route="chat",kind="completion"})', 8 * sent)
    prom.wait_for('sum(protege_shadow_mirrored_total{route="chat"})', sent)
    prom.wait_for('sum(protege_shadow_mirrored_total{route="chat",outcome="sent"})', sent)
    prom.wait_for('sum(protege_shadow_requests_total{route="chat",outcome="completed"})', sent)
    prom.wait_for('sum(protege_shadow_records_total{kind="pair",outcome="stored"})', sent)
    prom.wait_for('sum(protege_shadow_disagreement_count{route="chat"})', sent)
    prom.wait_for('sum(protege_shadow_redactions_total{kind="email"})', 1)
    for variant, n in by_arm.items():
        if n:
            prom.wait_for(f'sum(protege_feedback_total{{variant="{variant}",'
                          f'metric="thumbs_up"}})', n)
    for variant, n in by_arm.items():  # true from the student arm, false from the other
        if n:
            prom.wait_for(f'sum(protege_feedback_value_sum_total{{variant="{variant}",'
                          f'metric="thumbs_up"}})', n if variant == "student" else 0)
    prom.wait_for('sum(protege_engine_replica_up{variant="student",version="s1"})', 2)
    prom.wait_for('sum(protege_engine_replica_up{variant="smol",version="v1"})', 1)
    prom.wait_for('protege_student_fidelity_gap{variant="smol"}', 0.4)
    for outcome, n in LOOP_RUNS.items():
        prom.wait_for(f'protege_loop_runs_total{{outcome="{outcome}"}}', n)
    prom.wait_for('protege_loop_runs_total{outcome="abandoned"}', 0)
    prom.wait_for('sum(protege_loop_stages_total{stage="distill"})', 7)
    prom.wait_for("protege_loop_last_run_timestamp_seconds", LAST_RUN.timestamp())
    since = prom.value("time() - protege_loop_last_run_timestamp_seconds")
    assert since == pytest.approx(time.time() - LAST_RUN.timestamp(), abs=30)


def test_every_dashboard_query_returns_data(stack):
    _, prom, _ = stack
    # Counts first (rates need two samples of each series after the traffic).
    prom.wait_for('sum(protege_shadow_records_total{kind="pair",outcome="stored"})',
                  N_PLAIN + N_STREAM)
    queries = dashboard_queries()
    pending = {promql(expr): (board, title) for board, title, expr in queries}

    def answered() -> bool:
        for expr in [e for e in pending if prom.query(e)]:
            del pending[expr]
        return not pending

    wait_until(answered, "data from every dashboard query", 30, 1,
               lambda: "\n".join(f"{b} / {t}: {e}" for e, (b, t) in pending.items()))
    # And the fidelity panel names the served version.
    served = next(e for b, t, e in queries if t == "Fidelity gap by served version")
    result = prom.query(promql(served))
    assert [(r["metric"]["variant"], r["metric"]["version"], float(r["value"][1]))
            for r in result] == [("smol", "v1", pytest.approx(0.4))]
