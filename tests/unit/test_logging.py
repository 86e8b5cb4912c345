"""`core.logging`: JSON lines on stderr with timestamp, level, event and logger."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
import structlog

from core.logging import configure_logging, get_logger

log = get_logger("tests.made_at_import")  # before any configure_logging: must still follow it


@pytest.fixture(autouse=True)
def _reset():
    yield
    structlog.reset_defaults()


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_line_with_iso_timestamp_level_event_and_logger(capsys):
    configure_logging("info", json_logs=True)
    log.info("serving.request.completed", route="student", status=200)
    (line,) = lines(capsys.readouterr().err)
    assert line["event"] == "serving.request.completed"
    assert line["level"] == "info"
    assert line["logger"] == "tests.made_at_import"
    assert (line["route"], line["status"]) == ("student", 200)
    assert datetime.fromisoformat(line["timestamp"]).tzinfo is not None


def test_level_filters_and_reconfiguring_is_idempotent(capsys):
    configure_logging("warning", json_logs=True)
    configure_logging("warning", json_logs=True)
    log.info("shadow.teacher.sent")
    log.warning("shadow.teacher.failed", error="timeout")
    assert [line["event"] for line in lines(capsys.readouterr().err)] == ["shadow.teacher.failed"]
    configure_logging("debug", json_logs=True)
    log.debug("shadow.teacher.sent")
    assert [line["event"] for line in lines(capsys.readouterr().err)] == ["shadow.teacher.sent"]


def test_exceptions_are_rendered_into_the_line(capsys):
    configure_logging("info", json_logs=True)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("serving.engine.failed")
    (line,) = lines(capsys.readouterr().err)
    assert "RuntimeError: boom" in line["exception"]


def test_console_mode_is_not_json(capsys):
    configure_logging("info", json_logs=False)
    log.info("serving.app.started", port=8000)
    err = capsys.readouterr().err
    assert "serving.app.started" in err and "port=8000" in err


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="log level 'loud'"):
        configure_logging("loud", json_logs=True)


def test_loggers_survive_pickling(capsys):
    import pickle

    configure_logging("info", json_logs=True)
    bound = get_logger("tests.pickled").bind(replica="r1")
    for copy in (pickle.loads(pickle.dumps(log)), pickle.loads(pickle.dumps(bound))):
        copy.info("serving.replica.started")
    got = lines(capsys.readouterr().err)
    assert [(line["logger"], line.get("replica")) for line in got] == [
        ("tests.made_at_import", None), ("tests.pickled", "r1")
    ]  # fmt: skip
