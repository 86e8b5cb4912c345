"""The gateway on `shadow.store: postgres` (a real PostgreSQL server, tests/pg.py): mirrored pairs,
answered responses and feedback land in PostgreSQL; the report, the export and the review page
read them back from there; nothing is written to a SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ops.gateway import Gateway, gateway_env, wait_until
from shadow.store.postgres import PostgresStore
from tests.integration.conftest import API_KEY, REPO, wait_for_metric
from tests.pg import INSTALL_HINT, PgServer, find_bin_dir

pytestmark = pytest.mark.integration

MSG = [{"role": "user", "content": "Mail ann@example.com about the tides."}]


@pytest.fixture(scope="module")
def pg_gateway(tmp_path_factory):
    if find_bin_dir() is None:
        pytest.fail(f"PostgreSQL is not installed: {INSTALL_HINT}")
    tmp = tmp_path_factory.mktemp("pg-gateway")
    server = PgServer.create()
    env = {"PROTEGE_API_KEYS": API_KEY, "PROTEGE_POSTGRES_DSN": server.dsn()}
    config = {
        "server": {"ingress": {"replicas": 1, "num_cpus": 0}},
        "shadow": {"store": "postgres", "store_path": str(tmp / "never.sqlite"),
                   "spill_dir": str(tmp / "spill"), "semantic_model": None},
        "variants": {
            "student": {"engine": {"engine": "fake", "completion_tokens": 8}, "num_cpus": 0,
                        "version": "s1"},
            "teacher": {"engine": {"engine": "fake", "completion_tokens": 10}, "num_cpus": 0,
                        "version": "t1"}},
        "routes": {"student": {"variant": "student",
                               "shadow": {"variant": "teacher", "sample_rate": 1}}},
        "feedback": {"thumbs_up": {"type": "boolean"}},
    }
    try:
        gw = Gateway(config, tmp, env=env)
        gw.env, gw.tmp = env, tmp
        try:
            yield gw, PostgresStore(server.dsn())
        finally:
            gw.stop()
    finally:
        server.destroy()


def wait_for_pairs(store, ids, timeout_s=30):
    wait_until(lambda: store.existing(ids) == set(ids), f"pairs {ids} stored", timeout_s, 0.3,
               lambda: f"stored {store.existing(ids)}")


def cli(gw, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args, "--config",
                           str(gw.config_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=gateway_env(gw.env), check=False)


def test_pairs_responses_and_feedback_land_in_postgres(pg_gateway):
    gw, store = pg_gateway
    client = gw.client()
    plain = client.chat.completions.create(model="student", messages=MSG)
    chunks = list(client.chat.completions.create(model="student", messages=MSG, stream=True))
    ids = [plain.id, chunks[0].id]
    wait_for_pairs(store, ids)
    pair = store.get(plain.id)
    assert pair.student.text == plain.choices[0].message.content
    assert pair.student.version == "s1" and pair.teacher.version == "t1"
    assert pair.request["messages"][0]["content"] == "Mail [EMAIL] about the tides."
    assert pair.teacher_logprobs and 0.0 <= pair.disagreement <= 1.0
    wait_for_metric(gw, "protege_shadow_records_total", 2, kind="pair", outcome="stored")

    with gw.http() as http:  # feedback looks the response up in PostgreSQL
        r = http.post("/v1/feedback", json={"response_id": plain.id, "metric": "thumbs_up",
                                            "value": True})
    assert r.status_code == 200, r.text
    feedback = wait_until(lambda: [f for f in store.iter_feedback()
                                   if f.response.response_id == plain.id],
                          "feedback in PostgreSQL", 30, 0.3)
    assert [(f.metric, f.value, f.response.version) for f in feedback] == [
        ("thumbs_up", 1.0, "s1")]
    assert not (gw.tmp / "never.sqlite").exists()  # nothing went to the SQLite default


def test_report_export_and_review_read_postgres(pg_gateway, tmp_path):
    gw, store = pg_gateway
    unique = [{"role": "user", "content": "Which tides come twice a day?"}]  # export dedupes
    rid = gw.client().chat.completions.create(model="student", messages=unique).id
    wait_for_pairs(store, [rid])

    report = cli(gw, "shadow", "report", "--json")
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["pairs"] == store.count()

    out = cli(gw, "dataset", "export", "--out", str(tmp_path / "ds"))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for f in sorted((tmp_path / "ds").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert rid in {row["id"] for row in rows}

    with gw.http() as http:
        page = http.get("/review/api/pairs", params={"q": "twice a day"})
        assert page.status_code == 200, page.text
        assert rid in {item["pair_id"] for item in page.json()["items"]}
        one = http.get(f"/review/api/pairs/{rid}")
        assert one.status_code == 200 and one.json()["pair"]["pair_id"] == rid
        label = http.post(f"/review/api/pairs/{rid}/label",
                          json={"verdict": "teacher", "reviewer": "ml"})
        assert label.status_code in (200, 201), label.text
    assert [lb.verdict for lb in store.iter_labels() if lb.pair_id == rid] == ["teacher"]
