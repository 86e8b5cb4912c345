"""Sampling defaults: config, else the model's generation config (HF folder or GGUF), else 1.0;
and a request's own temperature / top_p always win."""

import json

import gguf
import numpy as np
import pytest

from serving.config import VariantConfig
from serving.defaults import SamplingDefaults, model_generation_config, sampling_defaults
from serving.protocol import parse_request


def variant(engine, **sampling):
    return VariantConfig(engine=engine, sampling=sampling)


def write_gguf(path, **metadata):
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        writer.add_float32(key, value)
    writer.add_tensor("x", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_gguf_generation_config_is_read(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", **{"general.sampling.temp": 0.25,
                                             "general.sampling.top_p": 0.5})
    assert model_generation_config(path) == {"temperature": 0.25, "top_p": 0.5}
    got = sampling_defaults(variant({"engine": "llamacpp", "path": str(path)}), lambda p: p)
    assert (got.temperature, got.top_p) == (0.25, 0.5)
    assert dict(got.source) == {"temperature": "model", "top_p": "model"}


def test_the_config_wins_over_the_model_and_openai_fills_the_rest(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "generation_config.json").write_text(
        json.dumps({"temperature": 0.7, "do_sample": True}))
    engine = {"engine": "transformers", "model": str(tmp_path / "hf")}
    got = sampling_defaults(variant(engine), lambda p: p)
    assert (got.temperature, got.top_p) == (0.7, 1.0)
    assert got.card()["source"] == {"temperature": "model", "top_p": "openai"}
    got = sampling_defaults(variant(engine, temperature=0.0, top_p=0.9), lambda p: p)
    assert (got.temperature, got.top_p) == (0.0, 0.9)
    assert got.card()["source"] == {"temperature": "config", "top_p": "config"}


def test_a_model_value_out_of_range_is_clamped_and_no_metadata_is_openai(tmp_path):
    path = write_gguf(tmp_path / "hot.gguf", **{"general.sampling.temp": 5.0})
    got = sampling_defaults(variant({"engine": "llamacpp", "path": str(path)}), lambda p: p)
    assert got.temperature == 2.0
    plain = sampling_defaults(variant({"engine": "fake"}), lambda p: p)
    assert plain == SamplingDefaults(1.0, 1.0, (("temperature", "openai"), ("top_p", "openai")))
    assert model_generation_config(tmp_path / "missing.gguf") == {}


def test_the_config_is_range_checked():
    with pytest.raises(ValueError, match="temperature"):
        variant({"engine": "fake"}, temperature=3)


@pytest.mark.parametrize("kind, body", [
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}),
    ("completion", {"prompt": "hi"}),
])
def test_a_request_takes_the_defaults_only_for_what_it_omits(kind, body):
    defaults = SamplingDefaults(0.2, 0.9)

    def params(**fields):
        request = parse_request(kind, json.dumps({"model": "m", **body, **fields}))
        p = request.to_generation_requests("id", defaults)[0].params
        return p.temperature, p.top_p

    assert params() == (0.2, 0.9)
    assert params(temperature=None, top_p=None) == (0.2, 0.9)  # null is omitted
    assert params(temperature=1.0) == (1.0, 0.9)
    assert params(top_p=1) == (0.2, 1.0)
    request = parse_request(kind, json.dumps({"model": "m", **body}))
    assert request.to_generation_requests("id")[0].params.temperature == 1.0  # OpenAI's
