"""Distillation data: shadow exports and prompt files in, tokenized training examples out.

Owns reading `protege dataset export` files (JSONL or Parquet) and plain prompt files, turning a
chat into `input_ids` + `labels` with the tokenizer's own chat template, and batching those into
torch tensors (packed, or padded in length buckets). It does not own the training loop, the
losses or the teacher.

Conventions (the recipes rely on them):
- `labels` are aligned with `input_ids`, NOT shifted: `labels[i]` is `input_ids[i]` where that
  token is learned and -100 where it is not. The training loop shifts (logits at i predict
  labels[i + 1]), as `transformers` models do when given `labels`.
- `input_ids` are the template's tokenization of the whole conversation. One exception: when
  the answer's first characters would merge with the header's last token (a BPE answer starting
  with a newline), the answer is tokenized on its own after the prompt's tokens, which is how
  the model generates it.
- The prompt is everything the template renders for `messages[:-1]` with
  `add_generation_prompt=True`: system and user turns and the assistant header. It is -100.
  The answer is the assistant's content plus the end-of-turn token the template writes right
  after it (`<|im_end|>` in ChatML), labelled with their ids. Whatever the template renders after
  that (ChatML's closing newline) stays in `input_ids` with label -100.
- An example always starts with a -100 prompt token, so packed examples never learn across the
  boundary from one example into the next.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shadow.export import content_key, split_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label of a token that is not learned (torch's cross_entropy ignore_index)
Messages = list[dict[str, str]]


def load_chat_examples(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a shadow export (`.jsonl` or `.parquet`); each ends with the assistant's answer.

    `teacher_logprobs` (JSON text in Parquet) comes back as a list, or None.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [(f"{path} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    else:
        raise ValueError(f"{path}: unknown extension {path.suffix!r} (allowed: .jsonl, .parquet)")
    examples = []
    for where, row in rows:
        messages = row.get("messages")
        if not messages:
            raise ValueError(f"{where}: no messages")
        if messages[-1].get("role") != "assistant":
            raise ValueError(f"{where}: the last message is the {messages[-1].get('role')!r}'s, "
                             "not the assistant's: an example must end with the answer to learn")
        logprobs = row.get("teacher_logprobs")
        if isinstance(logprobs, str):
            logprobs = json.loads(logprobs)
        examples.append({**row, "messages": _messages(messages), "teacher_logprobs": logprobs})
    if not examples:
        raise ValueError(f"no examples in {path}: export some with `protege dataset export`")
    return examples


def load_prompts(path: str | Path) -> list[Messages]:
    """Prompts as chat messages: `.txt` (one per non-empty line) or `.jsonl` (`messages` or
    `prompt` per row; a conversation must not end with an assistant turn)."""
    path = Path(path)
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [[{"role": "user", "content": line.strip()}] for line in lines if line.strip()]
    elif path.suffix == ".jsonl":
        prompts = []
        for where, row in _jsonl_rows(path):
            if row.get("messages"):
                if row["messages"][-1].get("role") == "assistant":
                    raise ValueError(f"{where}: ends with an assistant turn; a prompt file holds "
                                     "prompts only (answered chats: load_chat_examples)")
                prompts.append(_messages(row["messages"]))
            elif row.get("prompt"):
                prompts.append([{"role": "user", "content": row["prompt"]}])
            else:
                raise ValueError(f"{where}: neither `messages` nor `prompt`")
    else:
        raise ValueError(f"{path}: unknown extension {path.suffix!r} (allowed: .txt, .jsonl)")
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def tokenize_example(tokenizer: PreTrainedTokenizerBase, messages: Messages, *,
                     max_length: int) -> dict[str, list[int]] | None:
    """`input_ids` and aligned `labels` (see the module docstring), cut to `max_length` from the
    end; None when the cut leaves no answer token to learn."""
    name = tokenizer.name_or_path or type(tokenizer).__name__
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer {name!r} has no chat template: set "
                         "`tokenizer.chat_template` (a Jinja string, e.g. ChatML) first")
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                                add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(f"the chat template of tokenizer {name!r} renders the prompt (with "
                         "add_generation_prompt=True) differently from the start of the whole "
                         "conversation, so the answer cannot be told apart; use a template "
                         "that renders earlier turns the same whatever follows")
    prompt_ids, ids = _encode(tokenizer, prompt_text), _encode(tokenizer, full_text)
    if ids[:len(prompt_ids)] != prompt_ids:  # the answer's start merged into the header's end
        ids = prompt_ids + _encode(tokenizer, full_text[len(prompt_text):])
    end = _answer_end(tokenizer, ids, full_text[len(prompt_text):], messages[-1]["content"])
    start = len(prompt_ids)
    labels = [IGNORE] * start + ids[start:end] + [IGNORE] * (len(ids) - end)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def tokenize_all(tokenizer: PreTrainedTokenizerBase, conversations: list[Messages], *,
                 max_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """`tokenize_example` over many; the examples kept, and how many were cut to no answer."""
    done = [tokenize_example(tokenizer, m, max_length=max_length) for m in conversations]
    kept = [e for e in done if e is not None]
    return kept, len(done) - len(kept)


def pack(examples: list[dict[str, list[int]]], *, max_length: int, pad_id: int,
         batch_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Examples concatenated in order into rows of at most `max_length` tokens (next-fit: a new
    row starts when the next example does not fit), `batch_size` rows per batch.

    Each batch: `input_ids`, `labels`, `position_ids` (restarting at 0 for each example) and
    `attention_mask` (1 on tokens, 0 on padding), all `[rows, longest row]`, `torch.long`.
    The mask does not stop one example attending to the one before it in the same row; only an
    attention that reads `position_ids` (e.g. flash_attention_2) keeps them apart.
    """
    rows: list[list[dict[str, list[int]]]] = []
    used = max_length
    for e in examples:
        n = len(e["input_ids"])
        if n > max_length:
            raise ValueError(f"an example of {n} tokens does not fit max_length={max_length}: "
                             "tokenize with the same max_length")
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += n
    packed = [{"input_ids": [t for e in row for t in e["input_ids"]],
               "labels": [t for e in row for t in e["labels"]],
               "position_ids": [p for e in row for p in range(len(e["input_ids"]))]}
              for row in rows]
    return [_collate(packed[i:i + batch_size], pad_id) for i in range(0, len(packed), batch_size)]


def bucket_batches(examples: list[dict[str, list[int]]], *, batch_size: int, pad_id: int,
                   seed: int) -> list[dict[str, torch.Tensor]]:
    """Batches of similar length, each right-padded to its longest example (`input_ids` with
    `pad_id`, `labels` with -100, `attention_mask` 0), in an order shuffled by `seed`."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return [_collate([examples[i] for i in b], pad_id) for b in batches]


def split_by_hash(examples: list[Any], validation_share: float) -> tuple[list[Any], list[Any]]:
    """(train, validation). Exported rows keep their `split`; anything else (a dict with
    `messages`, or a message list) goes by the hash of its prompt messages, as the export does,
    so a prompt and its answered chat land in the same split."""
    if not 0.0 <= validation_share <= 1.0:
        raise ValueError(f"validation_share must be in [0, 1], got {validation_share}")
    train, validation = [], []
    for e in examples:
        split = e.get("split") if isinstance(e, dict) else None
        if split not in ("train", "validation"):
            messages = e["messages"] if isinstance(e, dict) else e
            prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            split = split_of(content_key(prompt), validation_share)
        (validation if split == "validation" else train).append(e)
    return train, validation


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template already wrote any BOS/special tokens as text, as apply_chat_template does.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _answer_end(tokenizer: PreTrainedTokenizerBase, ids: list[int], after_prompt: str,
                content: str) -> int:
    """Index in `ids` just past the answer and the end-of-turn token the template puts after it;
    everything after the prompt when the template rewrote the answer beyond a trim."""
    for text in (content, content.strip()):
        if text and after_prompt.startswith(text):
            tail = _encode(tokenizer, after_prompt[len(text):])
            if not tail:
                return len(ids)
            if ids[len(ids) - len(tail):] == tail:  # the answer's tokens end where the tail starts
                return len(ids) - len(tail) + (tail[0] in tokenizer.all_special_ids)
    return len(ids)


def _jsonl_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not JSON ({e})") from None
            if isinstance(row, dict):
                rows.append((f"{path} line {n}", row))
                continue
            raise ValueError(f"{path} line {n}: write one JSON object per line")
    return rows


def _messages(messages: list[dict[str, Any]]) -> Messages:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_id, "labels": IGNORE, "position_ids": 0}
    batch = {key: torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows],
                               dtype=torch.long)
             for key, value in fill.items() if key in rows[0]}
    batch["attention_mask"] = torch.tensor(
        [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows],
        dtype=torch.long)
    return batch
