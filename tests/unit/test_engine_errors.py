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
