"""`validate`: run every enabled check of a gate config on a student, then champion vs
challenger, and write the report."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distill.gate import runners
from distill.gate.config import GateConfig, Progress
from distill.gate.machine import machine_facts
from distill.gate.plan import prepare
from distill.gate.report import GateReport, write_report


def validate(student: str, teacher: str | None, config: GateConfig, *,
             champion: str | None = None, out_dir: Path | None = None,
             progress: Progress | None = None,
             load_settings: Callable[[Path], Any] | None = None) -> GateReport:
    """Run every enabled check on `student` (and `teacher`); with a `champion` (the version
    serving now) run them on it too and decide champion vs challenger with paired tests; write
    gate.json and gate.html to `out_dir` when given. `load_settings` reads the gateway settings
    that `ab.settings` names (the caller's loader, `ops.settings.load_settings`). Raises
    `GateError` before running anything when an argument, the suite or a data file is bad."""
    started, wall = datetime.now(UTC), time.perf_counter()
    plan = prepare(student, teacher, champion, config, progress or (lambda _msg: None),
                   load_settings)
    checks: dict[str, Any] = {}
    failures: list[str] = []
    for name, run in (("latency", runners.check_latency), ("tasks", runners.check_tasks),
                      ("edge_cases", runners.check_edge_cases),
                      ("fidelity", runners.check_fidelity),
                      ("calibration", runners.check_calibration), ("ab", runners.check_ab)):
        if not getattr(config, name).enabled:
            checks[name] = {"status": "disabled", "summary": "disabled"}
            continue
        plan.say(f"{name}: running")
        t0 = time.perf_counter()
        try:
            result, failed = run(plan)
        except Exception as e:  # noqa: BLE001 - a check that cannot run fails the gate, stated
            result = {"status": "error", "summary": f"{type(e).__name__}: {e}"}
            failed = [f"{name}: could not run ({type(e).__name__}: {e})"]
        if result["status"] not in ("skipped", "error"):
            result["status"] = "failed" if failed else "passed"
        result["seconds"] = round(time.perf_counter() - t0, 2)
        checks[name], failures = result, failures + failed
        plan.say(f"{name}: {result['status']} ({result['seconds']} s)")
    if champion is not None:
        checks["champion"], failed = runners.check_champion(plan)
        failures += failed
        plan.say(f"champion: {checks['champion']['status']} ({checks['champion']['summary']})")
    meta = {"student": student, "teacher": teacher, "champion": champion,
            "started_at": started.isoformat(),
            "duration_s": round(time.perf_counter() - wall, 2), "machine": machine_facts(),
            "config": config.model_dump(mode="json")}
    report = GateReport(passed=not failures, failures=failures, checks=checks, meta=meta)
    if out_dir is not None:
        write_report(report, out_dir)
    return report
