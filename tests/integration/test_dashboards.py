"""The Grafana dashboards in ops/dashboards: valid, provisioning-ready JSON whose every query
parses as PromQL (`promtool check rules`) and reads only metric names protege exports."""

from __future__ import annotations

import re
import subprocess
from collections import Counter

import pytest
import yaml

from tests.metricnames import exported, referenced
from tests.promserver import binary, dashboard_queries, dashboards, panels, promql

pytestmark = pytest.mark.integration

BOARDS = dashboards()
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_the_four_dashboards_exist_with_unique_uids_and_titles():
    assert set(BOARDS) == {"gateway.json", "shadow.json", "ab.json", "distill.json"}
    uids = [b["uid"] for b in BOARDS.values()]
    titles = [b["title"] for b in BOARDS.values()]
    assert len(set(uids)) == len(uids) and len(set(titles)) == len(titles)
    for name, board in BOARDS.items():
        assert board["uid"].startswith("protege-") and len(board["uid"]) <= 40, name
        assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36, name
        assert "id" not in board or board["id"] is None, name  # provisioning assigns it


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_panel_uses_the_datasource_variable(name):
    board = BOARDS[name]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DATASOURCE, (name, v["name"])
            metric = re.fullmatch(r"label_values\((\w+)[{,].*", v["definition"])
            assert metric and metric.group(1) in exported(), (name, v["definition"])
    ids = Counter(p["id"] for p in panels(board))
    assert all(n == 1 for n in ids.values()), (name, ids)
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, (name, title)
        assert panel.get("description"), (name, title)
        assert panel["fieldConfig"]["defaults"].get("unit"), (name, title)
        assert panel["targets"], (name, title)
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), (name, title)
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (name, title)


def test_every_expression_reads_only_exported_metrics():
    names = exported()
    queries = dashboard_queries()
    assert len(queries) > 40
    unknown = {(board, title, n) for board, title, expr in queries
               for n in referenced(expr) if n not in names}
    assert not unknown, sorted(unknown)


def test_every_expression_parses_as_promql(tmp_path):
    promtool = binary("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make prometheus` installs it")
    rules = [{"record": f"dashboard:query_{i}:expr", "expr": promql(expr)}
             for i, (_, _, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules)} rules found" in out.stdout


def test_grafana_variables_become_promql():
    assert promql('rate(x{route=~"$route"}[$__rate_interval])') == 'rate(x{route=~".*"}[1m])'
    assert promql('increase(x{v=~"${variant}"}[$__range])') == 'increase(x{v=~".*"}[1h])'
