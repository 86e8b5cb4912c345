"""The student's teacher-forced token probabilities, for calibration and label probabilities:
llama.cpp (`logits_all`) for a GGUF, transformers for a model folder."""

from __future__ import annotations

import os

import numpy as np

from distill.gate import checks as gc
from distill.gate.config import GateError, Messages


class GgufScorer:
    """Teacher-forced log-probabilities from a GGUF (llama.cpp, `logits_all`), prompts rendered
    with the GGUF's chat template as the llamacpp engine renders them."""

    def __init__(self, path: str, n_ctx: int, n_threads: int | None):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        threads = n_threads or len(os.sched_getaffinity(0))
        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads,
                         n_threads_batch=threads, logits_all=True, verbose=False)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise GateError(f"{path} has no chat template (tokenizer.chat_template)")
        model = self.llm._model
        eos, bos = model.token_eos(), model.token_bos()
        self.eos = eos
        self.chat = Jinja2ChatFormatter(
            template, eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "", add_generation_prompt=True)

    def encode(self, messages: Messages, answer: str, *, end: bool) -> tuple[list[int], list[bool]]:
        """Prompt tokens, then the answer tokenized on its own (and EOS when `end`)."""
        prompt = self.llm.tokenize(self.chat(messages=messages).prompt.encode(), add_bos=False,
                                   special=True)
        tail = self.llm.tokenize(answer.encode(), add_bos=False, special=False)
        tail += [self.eos] if end and self.eos != -1 else []
        return prompt + tail, [False] * len(prompt) + [True] * len(tail)

    def logprobs(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return gc.log_softmax(self.llm.scores[:len(ids)])

    def close(self) -> None:
        self.llm.close()


class HfScorer:
    """Teacher-forced log-probabilities from a Hugging Face model folder (transformers)."""

    def __init__(self, folder: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        if not self.tokenizer.chat_template:
            raise GateError(f"{folder}: the tokenizer has no chat template")

    def encode(self, messages: Messages, answer: str, *, end: bool) -> tuple[list[int], list[bool]]:
        """Prompt tokens, then the answer tokenized on its own (and EOS when `end`)."""
        tok = self.tokenizer
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        tail = tok(answer, add_special_tokens=False)["input_ids"]
        tail += [tok.eos_token_id] if end and tok.eos_token_id is not None else []
        return prompt + tail, [False] * len(prompt) + [True] * len(tail)

    def logprobs(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([ids])).logits[0]
        return self.torch.log_softmax(logits.double(), dim=-1).numpy()

    def close(self) -> None:
        self.model = None
