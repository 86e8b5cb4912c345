"""The packaged all-MiniLM-L6-v2 through SemanticEmbedder: sentence-transformers' embeddings."""

import pytest

from ops.models import MODELS, default_models_dir
from shadow.embedder import SemanticEmbedder
from shadow.scoring import cosine

pytestmark = pytest.mark.e2e


def test_packaged_scorer_embeds_like_sentence_transformers():
    path = default_models_dir() / MODELS["scorer"].path
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"{path} is missing: run `make models` (make test does it)")
    embed = SemanticEmbedder(path, threads=1)
    assert embed.max_length == 256 and embed.dimension == 384

    cat, cat_again, revenue = embed(
        ["The cat sits on the mat", "A cat is sitting on a mat", "Quarterly revenue grew by 5%"]
    )
    assert cosine(cat, cat_again) > 0.8
    assert cosine(cat, revenue) < 0.2
    assert cosine(cat, cat_again) - cosine(cat, revenue) > 0.6

    # sentence-transformers' own quickstart prints this matrix for all-MiniLM-L6-v2: matching it
    # checks tokenizer, truncation, mean pooling and normalisation together.
    published = [[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]]
    vectors = embed(
        ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    )
    for i, u in enumerate(vectors):
        assert [cosine(u, v) for v in vectors] == pytest.approx(published[i], abs=1e-3)
