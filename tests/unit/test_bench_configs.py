"""The benchmark's gateway configurations stay valid as the example configurations change."""

import yaml

from loadtests.bench_gateway import a_config, b_config
from ops.settings import load_settings


def test_bench_configs_are_valid_settings(tmp_path):
    for name, config in (("a", a_config()), ("b", b_config())):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        settings = load_settings(path)
        assert len(settings.routes) == 1


def test_b_serves_the_packaged_student_alone():
    settings_b = b_config()
    (variant,) = settings_b["variants"].values()
    assert variant["promotable"] is False  # the direct side runs the packaged file too
    assert "shadow" not in settings_b["routes"]["student"]
    assert "feedback" not in settings_b


def test_the_batching_and_litellm_bench_configs_are_valid_settings(tmp_path):
    from loadtests.bench_batching import config
    from loadtests.bench_litellm import protege_config

    batching = config(files={"Q8_0": str(tmp_path / "student.Q8_0.gguf")})
    litellm = protege_config("http://127.0.0.1:9/v1")
    for name, raw in (("batching", batching), ("litellm", litellm)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        settings = load_settings(path)
        assert set(settings.routes) == set(raw["routes"])
    assert {"sequential", "batched", "sequential-q8_0", "batched-q8_0"} <= set(batching["routes"])
    assert batching["variants"]["batched-q8_0"]["engine"]["path"].endswith("student.Q8_0.gguf")
    assert [v.get("in_ingress", False) for v in litellm["variants"].values()] == [False, True]
