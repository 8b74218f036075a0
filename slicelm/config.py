"""Engine configuration with vLLM's flag names (``EngineArgs``) and the derived configs it builds."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
               "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4,
               "tib": 1 << 40}


def parse_size(value: str | int | None) -> int | None:
    """``"14GiB"``, ``"14000MiB"``, ``"8g"``, ``123`` -> bytes."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot parse memory size {value!r}: use e.g. 14GiB, 14000MiB or a byte count")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def resolve_dtype(dtype: str | torch.dtype, config_dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto`` takes the checkpoint's dtype on a GPU and float32 on the CPU (the CPU is our oracle)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(str(config_dtype or "bfloat16").replace("torch.", ""), torch.bfloat16)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


@dataclass
class StructuredOutputsConfig:
    """vLLM's ``--structured-outputs-config`` (JSON): the grammar backend and engine-wide JSON options."""

    backend: Literal["auto", "guidance", "xgrammar"] = "auto"  # auto: guidance (llguidance)
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    @classmethod
    def parse(cls, value: str | dict[str, Any] | StructuredOutputsConfig | None) -> StructuredOutputsConfig:
        if value is None or isinstance(value, StructuredOutputsConfig):
            return value or cls()
        import json

        try:
            data = json.loads(value) if isinstance(value, str) else dict(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--structured-outputs-config: not valid JSON: {e}") from e
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"--structured-outputs-config: unknown key {unknown[0]!r} (known: {sorted(known)})")
        if data.get("backend", "auto") not in ("auto", "guidance", "xgrammar"):
            raise ValueError(f"--structured-outputs-config: backend must be auto, guidance or xgrammar; got "
                             f"{data['backend']!r}")
        return cls(**data)

    @property
    def backend_name(self) -> str:
        return "guidance" if self.backend == "auto" else self.backend


@dataclass
class EngineArgs:
    """Everything that configures one engine. Field names follow vLLM's ``EngineArgs``."""

    model: str = "smollm2-135m-instruct"
    tokenizer: str | None = None
    served_model_name: list[str] | str | None = None
    skip_tokenizer_init: bool = False
    task: Literal["auto", "generate", "embed", "score"] = "auto"
    dtype: str = "auto"
    seed: int = 0
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    gpu_memory_utilization: float = 0.9
    gpu_memory_budget: str | int | None = None
    kv_cache_memory_bytes: str | int | None = None
    enforce_eager: bool = False
    # GPUs (or CPU processes) one model is sharded over, Megatron-style; one worker process per extra rank.
    tensor_parallel_size: int = 1
    load_format: Literal["auto", "dummy"] = "auto"
    # vLLM's --quantization (None: what the checkpoint says) and --kv-cache-dtype (auto: the model's dtype)
    quantization: str | None = None
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = "auto"
    # Overlap host scheduling of step N+1 with device work of step N (default: on for CUDA).
    async_scheduling: bool | None = None
    chat_template: str | None = None
    # Attention backend: auto (Triton on CUDA, torch on CPU), torch or triton, and the Triton knobs.
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    attention_flash_prefill: bool = False
    attention_decode_splits: int | None = None
    # Pooling models (embeddings / cross-encoders)
    pooling_type: Literal["MEAN", "CLS", "LAST"] | None = None
    normalize: bool | None = None
    # CPU only: how much host memory the KV cache may take when no other size is given.
    cpu_kv_cache_bytes: int = 1 << 30
    disable_log_stats: bool = False
    structured_outputs_config: StructuredOutputsConfig | str | dict[str, Any] | None = None
    # Models by Hub id (slicelm/loader/hub.py): vLLM's download flags.
    revision: str | None = None
    tokenizer_revision: str | None = None
    code_revision: str | None = None  # refused: slicelm runs no remote code
    download_dir: str | None = None
    hf_token: str | bool | None = None  # a token, or True: the one `hf auth login` stored; None: env HF_TOKEN
    ignore_patterns: list[str] | tuple[str, ...] = ("original/**/*",)
    # vLLM's sleep mode (POST /sleep, /wake_up): weights and KV cache in memory that can be given back.
    enable_sleep_mode: bool = False
    # Elastic KV: KV memory mapped in chunks as the block pool grows, given back past the free watermark;
    # with a memory broker (SLICELM_KV_BROKER) it may also borrow beyond its slice.
    elastic_kv: bool = False
    elastic_kv_watermark: float = 0.1
    elastic_kv_max_bytes: str | int | None = None
    # Green-context SM partition of the engine: "N" SMs or "N@FIRST" (disjoint ranges across engines).
    green_context_sms: str | None = None

    def __post_init__(self) -> None:
        if self.code_revision is not None:
            raise ValueError(f"code_revision={self.code_revision!r} (--code-revision): slicelm runs no model code from "
                             "the Hub (there is no --trust-remote-code), so a code revision cannot apply; pin the "
                             "weights with --revision")
        if isinstance(self.ignore_patterns, str):
            self.ignore_patterns = [self.ignore_patterns]
        self.structured_outputs_config = StructuredOutputsConfig.parse(self.structured_outputs_config)
        if isinstance(self.served_model_name, str):
            self.served_model_name = [self.served_model_name]
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two from 1 to 128, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton; got {self.attention_backend!r}")
        if self.attention_decode_splits is not None and self.attention_decode_splits < 1:
            raise ValueError(f"attention_decode_splits must be >= 1, got {self.attention_decode_splits}")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise ValueError(f"kv_cache_dtype must be auto, fp8 or fp8_e4m3; got {self.kv_cache_dtype!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        single_gpu = [flag for flag, on in (("--enable-sleep-mode", self.enable_sleep_mode),
                                            ("--elastic-kv", self.elastic_kv),
                                            ("--green-context-sms", self.green_context_sms is not None)) if on]
        if self.tensor_parallel_size > 1 and single_gpu:
            raise ValueError(f"{', '.join(single_gpu)}: not supported with --tensor-parallel-size "
                             f"{self.tensor_parallel_size} (one engine on one GPU only)")
        if self.task not in ("auto", "generate", "embed", "score"):
            raise ValueError(f"task must be one of auto, generate, embed, score; got {self.task!r}")
        if not 0 <= self.elastic_kv_watermark <= 1:
            raise ValueError(f"elastic_kv_watermark must be in [0, 1], got {self.elastic_kv_watermark}")
        self.gpu_memory_budget = parse_size(self.gpu_memory_budget)
        self.kv_cache_memory_bytes = parse_size(self.kv_cache_memory_bytes)
        self.elastic_kv_max_bytes = parse_size(self.elastic_kv_max_bytes)

    # ----------------------------------------------------------------------------------- CLI
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Adds vLLM-named engine flags (``--max-model-len`` …) to ``parser``."""
        d = EngineArgs()
        g = parser.add_argument_group("engine")
        g.add_argument("--tokenizer", default=None,
                       help="tokenizer: a directory with tokenizer.json, a .gguf file or a bundled name "
                            "(default: the model's)")
        g.add_argument("--served-model-name", nargs="+", default=None,
                       help="names the model is served under; the first is used in metrics")
        g.add_argument("--skip-tokenizer-init", action="store_true")
        g.add_argument("--task", "--runner", dest="task", default=d.task,
                       choices=["auto", "generate", "embed", "score", "pooling"],
                       help="what the model serves (default: inferred from its architecture)")
        g.add_argument("--dtype", default=d.dtype, choices=["auto", *_DTYPES])
        g.add_argument("--seed", type=int, default=d.seed)
        g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
        g.add_argument("--max-model-len", type=int, default=None)
        g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
        g.add_argument("--max-num-batched-tokens", type=int, default=None)
        g.add_argument("--block-size", type=int, default=d.block_size)
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=d.enable_prefix_caching)
        g.add_argument("--num-gpu-blocks-override", type=int, default=None)
        g.add_argument("--scheduling-policy", default=d.scheduling_policy, choices=["fcfs", "priority"])
        g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
        g.add_argument("--gpu-memory-budget", default=None,
                       help="absolute GPU memory budget for this engine, e.g. 14GiB or 14000MiB")
        g.add_argument("--kv-cache-memory-bytes", default=None, help="KV cache size, e.g. 4GiB")
        g.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
        g.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                       help="shard the model over this many GPUs of this host (one process each; gloo "
                            "processes on the CPU)")
        g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                       help="overlap scheduling of the next step with the current one (default: on for CUDA)")
        g.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"],
                       help="dummy: random weights from config.json alone (benchmarks)")
        g.add_argument("--quantization", "-q", default=None,
                       choices=["awq", "awq_marlin", "gptq", "gptq_marlin", "compressed-tensors", "fp8"],
                       help="quantization method (default: the checkpoint's quantization_config); fp8 quantizes a "
                            "16-bit checkpoint at load")
        g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=["auto", "fp8", "fp8_e4m3"],
                       help="fp8: an e4m3 KV cache (half the bytes per block; scales from the checkpoint or 1.0)")
        g.add_argument("--chat-template", default=None, help="path to a Jinja chat template, or the template")
        g.add_argument("--attention-backend", default=d.attention_backend, choices=["auto", "torch", "triton"])
        g.add_argument("--attention-flash-prefill", action=argparse.BooleanOptionalAction,
                       default=d.attention_flash_prefill,
                       help="Triton backend: run prefix-free prefills with torch's varlen flash attention")
        g.add_argument("--attention-decode-splits", type=int, default=None,
                       help="Triton backend: fixed split-KV count of the decode kernel (default: by context length)")
        g.add_argument("--pooling-type", default=None, choices=["MEAN", "CLS", "LAST"])
        g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
        g.add_argument("--disable-log-stats", action="store_true")
        g.add_argument("--structured-outputs-config", default=None,
                       help='structured outputs as JSON: {"backend": "auto|guidance|xgrammar", '
                            '"disable_any_whitespace": false, "disable_additional_properties": false}')
        hub = parser.add_argument_group("models by Hub id")
        hub.add_argument("--revision", default=None, help="branch, tag or commit of the model's Hub repo")
        hub.add_argument("--tokenizer-revision", default=None,
                         help="revision of the tokenizer's repo (default: --revision for the model's own)")
        hub.add_argument("--code-revision", default=None, help="refused: slicelm runs no model code from the Hub")
        hub.add_argument("--download-dir", default=None,
                         help="cache directory for Hub snapshots (default: HF_HUB_CACHE, else HF_HOME/hub)")
        hub.add_argument("--hf-token", nargs="?", const=True, default=None,
                         help="Hub token for gated / private repos (no value: the stored login; default: env HF_TOKEN)")
        hub.add_argument("--ignore-patterns", nargs="+", default=list(d.ignore_patterns),
                         help="repo files never downloaded (glob patterns)")
        g.add_argument("--enable-sleep-mode", action="store_true",
                       help="allow POST /sleep and /wake_up (weights and KV cache in memory that can be given back)")
        g.add_argument("--elastic-kv", action="store_true",
                       help="map KV memory in chunks as needed and give free chunks back; with slicelm up's memory "
                            "broker, borrow free GPU memory beyond the slice")
        g.add_argument("--elastic-kv-watermark", type=float, default=d.elastic_kv_watermark,
                       help="fraction of the guaranteed KV blocks kept mapped while free before chunks are given back")
        g.add_argument("--elastic-kv-max-bytes", default=None,
                       help="largest KV cache an elastic engine may grow to (default: the GPU's memory)")
        g.add_argument("--green-context-sms", default=None,
                       help="run the engine in a CUDA green context of N SMs ('N', 'N%%' or 'N@FIRST_SM')")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names}
        if kwargs.get("task") == "pooling":
            kwargs["task"] = "auto"
        return cls(**kwargs)


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    policy: Literal["fcfs", "priority"] = "fcfs"


@dataclass
class CacheConfig:
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """What the engine resolved about its model."""

    model: str
    hf_config: dict[str, Any]
    architecture: str
    task: Literal["generate", "embed", "score"]
    dtype: torch.dtype
    max_model_len: int
    served_model_names: list[str]

    @property
    def is_pooling(self) -> bool:
        return self.task != "generate"
