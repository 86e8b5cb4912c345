"""IncrementalDetokenizer: streamed text equals the full decode, split characters held back."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from serving.engines.transformers import IncrementalDetokenizer


def byte_tokenizer():
    """Byte-level BPE without merges: one token per UTF-8 byte."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_incremental_detokenizer_holds_split_characters():
    fast = byte_tokenizer()
    text = "héllo wörld ✓ ok"
    ids = fast(text)["input_ids"]
    assert len(ids) == len(text.encode())  # one byte per token: characters span tokens
    detok = IncrementalDetokenizer(fast)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    cut = IncrementalDetokenizer(fast)
    partial = [cut.push(i) for i in fast("ab✓")["input_ids"][:-1]]  # last byte of ✓ missing
    assert "".join(partial) == "ab"
    assert cut.flush() == "\ufffd"
