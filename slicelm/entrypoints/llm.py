"""Offline API with vLLM's call shapes: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from slicelm.config import EngineArgs
from slicelm.engine.core_messages import utility_error
from slicelm.engine.engine import LLMEngine, PromptType
from slicelm.engine.request import PoolingOutput, RequestOutput
from slicelm.pooling_params import PoolingParams
from slicelm.sampling_params import SamplingParams


class LLM:
    """Generates for a batch of prompts at once, with continuous batching inside.

    Keyword arguments are ``EngineArgs`` fields (``max_model_len``, ``max_num_seqs``,
    ``enable_prefix_caching``, ``num_gpu_blocks_override``, ``skip_tokenizer_init``, …).
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def sleep(self, level: int = 1) -> None:
        """vLLM's ``LLM.sleep`` (needs ``enable_sleep_mode=True``): level 1 keeps the weights in host memory,
        level 2 drops them; both drop the KV cache. Call it with no request in flight."""
        self._core_call("sleep", level, "abort")

    def wake_up(self, tags: list[str] | None = None) -> float:
        """vLLM's ``LLM.wake_up`` (``tags``: weights, kv_cache); returns the seconds it took."""
        return float(self._core_call("wake_up", tags))

    def _core_call(self, method: str, *args: Any) -> Any:
        core = self.engine.core
        core.utility(0, method, list(args))
        replies, _ = core.take_replies()
        reply = replies[-1]
        if reply.error is not None:
            raise utility_error(reply.error)
        return reply.result

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        prompt_list = self._as_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError("sampling_params: the list must be as long as the prompts")
        return self._run(prompt_list, params_list, use_tqdm, priority)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True was set)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptType] = []
        for conv in conversations:
            text = tokenizer.apply_chat_template(
                conv,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=chat_template,
                **(chat_template_kwargs or {}),
            )
            # The template already carries BOS and special tokens: do not add them twice.
            prompts.append({"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def embed(self, prompts: PromptType | Sequence[PromptType], pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True) -> list[PoolingOutput]:
        params = pooling_params or PoolingParams()
        prompt_list = self._as_list(prompts)
        return self._run(prompt_list, [params] * len(prompt_list), use_tqdm, None)

    @staticmethod
    def _as_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, str | dict):
            return [prompts]
        prompts = list(prompts)
        if prompts and isinstance(prompts[0], int):
            return [prompts]  # one prompt of token ids
        return prompts

    def _run(self, prompts: list[PromptType], params: list, use_tqdm: bool, priority: Sequence[int] | None) -> list:
        engine = self.engine
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                rid = engine.next_request_id()
                engine.add_request(rid, prompt, p, priority=priority[i] if priority else 0, stream=False)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # nothing half-added stays in the engine
            raise
        results: dict[str, RequestOutput | PoolingOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
            try:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            bar.update(1)
            except BaseException:
                engine.abort_request(ids)
                raise
        return [results[rid] for rid in ids]
