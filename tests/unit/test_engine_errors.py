"""Engine exceptions cross process boundaries (Ray pickles them) with their type and fields."""

import pickle

import pytest

from serving.engines.base import EngineError, PromptTooLong
from serving.engines.remote import UpstreamError


@pytest.mark.parametrize(
    "error",
    [PromptTooLong(10, 20, 16), EngineError("boom"), UpstreamError(404, "no such model")],
)
def test_round_trip(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert vars(back) == vars(error)


async def test_vllm_engine_without_vllm_says_how_to_install(tmp_path):
    import importlib.util

    from serving.engines import build_engine
    from serving.engines.config import VllmEngine as VllmConfig

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    engine = build_engine(VllmConfig(model=str(tmp_path)), lambda p: p)
    with pytest.raises(EngineError, match=r"protege\[vllm\]"):
        await engine.start()
