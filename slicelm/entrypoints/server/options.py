"""API-level server settings (vLLM's frontend flags) and the vLLM flags refused at start.

``ApiOptions`` is what the endpoints read (``state.options``); ``add_api_args`` adds vLLM's flag names
to the ``serve`` parser; ``check_api_args`` refuses the values we cannot honour with a message naming
the flag. A vLLM flag that slicelm does not know at all is refused by argparse ("unrecognized
arguments: --flag"), never dropped.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from slicelm.entrypoints.server.embed_chunking import PoolerConfig


@dataclass
class ApiOptions:
    enable_prompt_tokens_details: bool = False
    enable_force_include_usage: bool = False
    enable_per_request_metrics: bool = False
    enable_request_id_headers: bool = False
    enable_server_load_tracking: bool = False
    return_tokens_as_token_ids: bool = False
    trust_request_chat_template: bool = False
    enable_tokenizer_info_endpoint: bool = False
    max_logprobs: int = 20  # -1: no limit (the whole vocabulary)
    scheduling_policy: str = "fcfs"
    max_prompt_chars: int | None = None  # None: derived from max_model_len (see ServerState users)
    pooler_config: PoolerConfig = field(default_factory=PoolerConfig)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False
    structured_outputs_backend: str = "auto"  # --structured-outputs-config's backend (guided_decoding_backend)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ApiOptions:
        from slicelm.config import StructuredOutputsConfig

        return cls(
            enable_prompt_tokens_details=bool(getattr(args, "enable_prompt_tokens_details", False)),
            enable_force_include_usage=bool(getattr(args, "enable_force_include_usage", False)),
            enable_per_request_metrics=bool(getattr(args, "enable_per_request_metrics", False)),
            enable_request_id_headers=bool(getattr(args, "enable_request_id_headers", False)),
            enable_server_load_tracking=bool(getattr(args, "enable_server_load_tracking", False)),
            return_tokens_as_token_ids=bool(getattr(args, "return_tokens_as_token_ids", False)),
            trust_request_chat_template=bool(getattr(args, "trust_request_chat_template", False)),
            enable_tokenizer_info_endpoint=bool(getattr(args, "enable_tokenizer_info_endpoint", False)),
            max_logprobs=int(getattr(args, "max_logprobs", 20)),
            scheduling_policy=str(getattr(args, "scheduling_policy", "fcfs")),
            pooler_config=PoolerConfig.parse(getattr(args, "pooler_config", None)),
            enable_auto_tool_choice=bool(getattr(args, "enable_auto_tool_choice", False)),
            tool_call_parser=getattr(args, "tool_call_parser", None),
            exclude_tools_when_tool_choice_none=bool(getattr(args, "exclude_tools_when_tool_choice_none", False)),
            structured_outputs_backend=StructuredOutputsConfig.parse(
                getattr(args, "structured_outputs_config", None)).backend,
        )


def add_api_args(g: argparse._ArgumentGroup) -> None:
    """vLLM's frontend flags (``vllm serve --help``, group "Frontend")."""
    g.add_argument("--root-path", default="", help="FastAPI root_path when behind a path-based proxy")
    g.add_argument("--uds", default=None, help="serve on this Unix domain socket instead of host:port")
    g.add_argument("--enable-request-id-headers", action="store_true",
                   help="answer with an X-Request-Id header (the client's, or a generated one)")
    g.add_argument("--enable-server-load-tracking", action="store_true",
                   help="count the requests in flight on the engine routes; GET /load reports them")
    g.add_argument("--enable-force-include-usage", action="store_true",
                   help="every streamed response ends with a usage chunk, as if include_usage were set")
    g.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="report usage.prompt_tokens_details.cached_tokens")
    g.add_argument("--enable-per-request-metrics", action="store_true",
                   help="chat / completion responses of one generation carry vLLM's timing 'metrics' (TTFT, ITL, ...)")
    g.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprobs name tokens as 'token_id:{id}' (for tokens that are not valid UTF-8)")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="render a chat_template given in a request (otherwise such requests get 400)")
    g.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                   help="serve GET /tokenizer_info (it exposes the chat template and special tokens)")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprobs / prompt_logprobs / top_logprobs a request may ask for (-1: vocabulary)")
    g.add_argument("--show-hidden-metrics-for-version", default=None,
                   help="accepted for vLLM compatibility: slicelm hides no deprecated metrics")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="accepted for vLLM compatibility: chunked prefill is always on")
    g.add_argument("--pooler-config", default=None,
                   help='pooling settings as JSON: {"enable_chunked_processing": true, "max_embed_len": N, '
                        '"pooling_type": "MEAN", "normalize": true}')
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="tool_choice 'auto': the --tool-call-parser reads tool calls out of the generated text")
    g.add_argument("--tool-call-parser", default=None,
                   help="hermes (Qwen2.5/Qwen3, Hermes), llama3_json, mistral or pythonic")
    g.add_argument("--tool-parser-plugin", default=None, help="not supported: refused at start")
    g.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help="with tool_choice 'none', do not pass the tools to the chat template")
    g.add_argument("--api-server-count", "-asc", type=int, default=1,
                   help="API server processes (HTTP, tokenization, detokenization) in front of one engine-core "
                        "process, sharing one listening socket")


def check_api_args(args: argparse.Namespace) -> None:
    """Raises ``ValueError`` naming the flag for values slicelm cannot honour."""
    count = getattr(args, "api_server_count", 1)
    if count < 1:
        raise ValueError(f"--api-server-count must be >= 1, got {count}")
    if count > 1 and not getattr(args, "engine_process", True):
        raise ValueError(f"--api-server-count {count} needs the engine core in its own process: it cannot be "
                         "combined with --no-engine-process")
    if getattr(args, "enable_chunked_prefill", None) is False:
        raise ValueError("--no-enable-chunked-prefill: chunked prefill is always on in slicelm and cannot be "
                         "disabled")
    lp = getattr(args, "max_logprobs", 20)
    if lp < -1:
        raise ValueError(f"--max-logprobs must be >= 0, or -1 for the whole vocabulary; got {lp}")
    pooler = PoolerConfig.parse(getattr(args, "pooler_config", None))
    for key in ("pooling_type", "normalize"):  # the engine's own flags; an explicit flag wins
        if getattr(pooler, key) is not None and getattr(args, key, None) is None:
            setattr(args, key, getattr(pooler, key))
    if getattr(args, "tool_parser_plugin", None):
        raise ValueError("--tool-parser-plugin: tool parser plugins are not supported; use a built-in "
                         "--tool-call-parser (hermes, llama3_json, mistral, pythonic)")
    parser = getattr(args, "tool_call_parser", None)
    if getattr(args, "enable_auto_tool_choice", False) and parser is None:
        raise ValueError("--enable-auto-tool-choice: --tool-call-parser must be set as well")
    if parser is not None:
        from slicelm.entrypoints.server.tools import get_tool_parser

        get_tool_parser(parser)  # ValueError naming the flag and the available parsers
    if getattr(args, "uds", None) and getattr(args, "ssl_certfile", None):
        raise ValueError("--uds cannot be combined with --ssl-certfile")
