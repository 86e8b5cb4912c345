"""`ops.settings.load_settings`: YAML, `PROTEGE_` env overrides, one line per bad field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ops.settings import ConfigError, load_settings
from tests import REPO_ROOT

MINIMAL = """\
variants:
  tiny:
    engine: {engine: fake, completion_tokens: 4}
routes:
  chat: {variant: tiny}
"""


@pytest.fixture(autouse=True)
def _no_protege_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("PROTEGE_"):
            monkeypatch.delenv(key)


@pytest.fixture
def config(tmp_path: Path):
    def write(text: str = MINIMAL) -> Path:
        path = tmp_path / "protege.yaml"
        path.write_text(text)
        return path

    return write


def problems(err: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return str(err.value).splitlines()


def test_yaml_is_loaded_and_defaults_filled(config):
    s = load_settings(config())
    assert s.routes["chat"].variant == "tiny"
    assert s.variants["tiny"].engine.engine == "fake"
    assert s.variants["tiny"].engine.completion_tokens == 4
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8000)
    assert s.api_keys == ()


def test_env_overrides_yaml_with_nesting(config, monkeypatch):
    monkeypatch.setenv("PROTEGE_SERVER__PORT", "9001")
    monkeypatch.setenv("PROTEGE_LOGGING__LEVEL", "debug")
    s = load_settings(config(MINIMAL + "server: {port: 8000, host: 0.0.0.0}\n"))
    assert s.server.port == 9001
    assert s.server.host == "0.0.0.0"  # the YAML value survives next to the env override
    assert s.logging.level == "debug"


def test_api_keys_from_env_are_split_on_commas(config, monkeypatch):
    monkeypatch.setenv("PROTEGE_API_KEYS", "a, b,,c ")
    assert load_settings(config()).api_keys == ("a", "b", "c")


def test_explicit_overrides_merge_into_yaml(config):
    s = load_settings(config(), server={"port": 9100})
    assert s.server.port == 9100
    assert s.server.host == "127.0.0.1"


def test_bad_env_value_is_reported_like_a_yaml_one(config, monkeypatch):
    monkeypatch.setenv("PROTEGE_SERVER__PORT", "not-a-port")
    with pytest.raises(ConfigError) as err:
        load_settings(config())
    assert problems(err) == [
        "server.port: 'not-a-port' (Input should be a valid integer, unable to parse string as an"
        " integer)"
    ]


def test_one_line_per_bad_field_with_path_value_and_allowed(config):
    text = """\
server: {port: 70000}
variants:
  tiny:
    engine: {engine: fake, ttft_s: -1}
    num_cpus: -0.5
    colour: blue
routes:
  chat: {variant: tiny}
"""
    with pytest.raises(ConfigError) as err:
        load_settings(config(text))
    lines = problems(err)
    assert len(lines) == 4, lines
    assert "server.port: 70000 (Input should be less than or equal to 65535)" in lines
    assert "variants.tiny.engine.fake.ttft_s: -1 (Input should be greater than or equal to 0)" in (
        lines
    )
    assert "variants.tiny.num_cpus: -0.5 (Input should be greater than or equal to 0)" in lines
    assert "variants.tiny.colour: 'blue' (Extra inputs are not permitted)" in lines


def test_unknown_engine_lists_the_allowed_ones(config):
    with pytest.raises(ConfigError) as err:
        load_settings(config(MINIMAL.replace("engine: fake", "engine: onnx")))
    (line,) = problems(err)
    assert line.startswith("variants.tiny.engine: ")
    assert "'onnx'" in line
    for engine in ("llamacpp", "transformers", "vllm", "remote", "fake"):
        assert engine in line


def test_only_an_engine_without_a_model_is_served_in_the_ingress(config):
    inline = MINIMAL.replace("completion_tokens: 4}", "completion_tokens: 4}\n    in_ingress: true")
    assert load_settings(config(inline)).variants["tiny"].in_ingress
    llama = inline.replace("{engine: fake, completion_tokens: 4}",
                           "{engine: llamacpp, path: m.gguf}")
    with pytest.raises(ConfigError) as err:
        load_settings(config(llama))
    (line,) = problems(err)
    assert line.startswith("variants.tiny: ") and "in_ingress" in line
    assert "allowed with remote, fake" in line


def test_route_to_unknown_variant(config):
    with pytest.raises(ConfigError) as err:
        load_settings(config(MINIMAL.replace("variant: tiny", "variant: huge")))
    assert problems(err) == ["routes.chat.variant: 'huge' is not a variant (allowed: tiny)"]


AB = """\
variants:
  a: {engine: {engine: fake}, version: a1}
  b: {engine: {engine: fake}, version: b1}
routes:
  ab:
    variant: a
"""


def test_route_without_arms_is_its_primary_alone(config):
    s = load_settings(config(AB))
    route = s.routes["ab"]
    assert route.arms is None and route.sticky_key == "user"
    assert route.split() == [("a", 1.0)]


def test_route_arms_define_the_split(config):
    text = AB + ("    sticky_key: request\n"
                 "    arms: [{variant: a, weight: 3}, {variant: b, weight: 1}]\n")
    route = load_settings(config(text)).routes["ab"]
    assert route.split() == [("a", 3.0), ("b", 1.0)]
    assert route.sticky_key == "request"
    # The primary may hold weight 0: still the route's primary, without new traffic.
    text = AB + "    arms: [{variant: a, weight: 0}, {variant: b, weight: 1}]\n"
    assert load_settings(config(text)).routes["ab"].split() == [("a", 0.0), ("b", 1.0)]


@pytest.mark.parametrize(("arms", "line"), [
    ("[{variant: a, weight: 1}, {variant: c, weight: 1}]",
     "routes.ab.arms.1.variant: 'c' is not a variant (allowed: a, b)"),
    ("[{variant: a, weight: 0}, {variant: b, weight: 0}]",
     ("routes.ab.arms: [{'variant': 'a', 'weight': 0}, {'variant': 'b', 'weight': 0}] (every weight"
      " is 0; at least one must be greater than 0)")),
    ("[{variant: a, weight: 1}, {variant: b, weight: 1}, {variant: a, weight: 2}]",
     ("routes.ab.arms: [{'variant': 'a', 'weight': 1}, {'variant': 'b', 'weight': 1}, {'variant':"
      " 'a... ('a' listed more than once; each variant may be one arm only)")),
    ("[{variant: b, weight: 1}]",
     ("routes.ab.arms: [{'variant': 'b', 'weight': 1}] (the primary variant 'a' is not among them;"
      " include it (weight 0 for no traffic))")),
    ("[{variant: a, weight: -1}, {variant: b, weight: 1}]",
     "routes.ab.arms.0.weight: -1 (Input should be greater than or equal to 0)"),
    ("[{variant: a, weight: .nan}, {variant: b, weight: 1}]",
     "routes.ab.arms.0.weight: nan (Input should be a finite number)"),
    ("[{variant: a}]", "routes.ab.arms.0.weight: missing (required)"),
    ("[]", "routes.ab.arms: [] (List should have at least 1 item after validation, not 0)"),
], ids=["unknown-variant", "all-zero", "duplicate", "primary-missing", "negative", "nan",
        "no-weight", "empty"])
def test_bad_arms_are_one_line_each(config, arms, line):
    with pytest.raises(ConfigError) as err:
        load_settings(config(AB + f"    arms: {arms}\n"))
    assert problems(err) == [line]


def test_unknown_primary_and_arm_variants_are_both_named(config):
    text = AB.replace("variant: a", "variant: x") + "    arms: [{variant: x, weight: 1}]\n"
    with pytest.raises(ConfigError) as err:
        load_settings(config(text))
    assert problems(err) == [
        "routes.ab.variant: 'x' is not a variant (allowed: a, b)",
        "routes.ab.arms.0.variant: 'x' is not a variant (allowed: a, b)",
    ]


def test_sticky_key_lists_the_allowed_values(config):
    with pytest.raises(ConfigError) as err:
        load_settings(config(AB + "    sticky_key: session\n"))
    assert problems(err) == [
        "routes.ab.sticky_key: 'session' (Input should be 'user' or 'request')"]


def test_missing_sections_are_named(config):
    with pytest.raises(ConfigError) as err:
        load_settings(config("server: {port: 8000}\n"))
    assert problems(err) == ["variants: missing (required)", "routes: missing (required)"]


def test_unreadable_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=r"absent\.yaml: cannot read \(No such file"):
        load_settings(path)


def test_invalid_yaml(config):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(config("variants: {tiny: [unclosed\n"))


def test_top_level_must_be_a_mapping(config):
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_settings(config("- a\n- b\n"))


EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"default.yaml", "fake.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path):
    s = load_settings(path)
    assert s.routes
    for route in s.routes.values():
        assert route.variant in s.variants


def test_default_example_serves_the_packaged_models():
    s = load_settings(REPO_ROOT / "examples" / "default.yaml")
    student = s.variants[s.routes["student"].variant]
    teacher = s.variants[s.routes["teacher"].variant]
    assert student.engine.path == "models/student/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert teacher.engine.path == "models/teacher/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
    cpus = s.server.ingress.num_cpus + sum(v.num_cpus * v.replicas for v in s.variants.values())
    assert cpus <= 2, "the default must fit a 2-core machine"


def test_registry_root_is_absolute_or_a_url():
    base = {"variants": {"v": {"engine": {"engine": "fake"}}}, "routes": {"r": {"variant": "v"}}}
    assert load_settings(None, **base).registry_root() == str(REPO_ROOT / "data/registry")
    url = load_settings(None, **base, registry={"root": "s3://bucket/protege"}).registry_root()
    assert url == "s3://bucket/protege"
