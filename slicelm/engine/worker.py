"""Worker: owns the device, the model, the KV cache tensors and the model runner of one engine core.

The engine core builds it in named steps: ``init_device`` → ``load_model`` (resolve the checkpoint,
infer the task, build and load the model) → ``initialize_cache`` (plan memory, allocate the KV cache,
build the runner, derive the scheduler limits) → ``make_scheduler``. Tokenizers are the API side's
business: the worker never loads one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator

import torch

from slicelm.config import CacheConfig, EngineArgs, ModelConfig, SchedulerConfig, resolve_dtype
from slicelm.distributed.parallel_state import destroy_tp_group, get_tp_group, init_tp_group
from slicelm.engine.cuda_graphs import MIXED_MAX_TOKENS
from slicelm.engine.elastic import ElasticKV
from slicelm.engine.kv_cache import KVCacheManager, cdiv
from slicelm.engine.kv_memory import KVLayout, PagedKVMemory
from slicelm.engine.pooling_runner import PoolingRunner
from slicelm.engine.runner import BitmaskFn, ModelRunner, StepHandle, supports_mixed_graphs
from slicelm.engine.scheduler import Scheduler, SchedulerOutput
from slicelm.engine.weight_store import WeightStore
from slicelm.layers.linear import Linear, init_dummy_quantized, process_weights_after_loading
from slicelm.layers.quantization import KV_CACHE_DTYPES, QuantConfig, QuantizationError, parse_quant_config
from slicelm.layers.quantization.base import cast_model
from slicelm.loader.hub import HubOptions
from slicelm.loader.model_files import ModelSource, resolve_model
from slicelm.models.registry import get_model_class, is_pooling_architecture
from slicelm.slicing.broker_client import BrokerLink, BrokerUnavailable

logger = logging.getLogger(__name__)


def pick_device(name: str, rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of tensor-parallel rank ``rank``: ``cuda`` / ``cuda:i`` give rank r the r-th GPU from there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but no CUDA GPU is available")
        base = device.index if device.index is not None else (torch.cuda.current_device() if world_size == 1 else 0)
        if base + world_size > torch.cuda.device_count():
            raise ValueError(f"--tensor-parallel-size {world_size} on device {name!r} needs GPUs {base}.."
                             f"{base + world_size - 1}, but {torch.cuda.device_count()} are visible "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})")
        device = torch.device("cuda", base + rank)
        torch.cuda.set_device(device)
    return device


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """vLLM's ``--load-format dummy``: small random weights (norm scales 1), made on the device. Each parameter
    draws from a stream seeded by its name, so tensor-parallel ranks hold the same replicated tensors (a MoE
    router routes alike on every rank)."""
    gen = torch.Generator(device=next(model.parameters()).device)
    quantized = init_dummy_quantized(model, gen.manual_seed(seed))
    for name, p in model.named_parameters():
        if name in quantized:
            continue
        if "norm" in name.lower():
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen.manual_seed(seed + zlib.crc32(name.encode())))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def infer_task(args: EngineArgs, architecture: str) -> str:
    if args.task != "auto":
        return args.task
    if is_pooling_architecture(architecture):
        return "score" if architecture.endswith("ForSequenceClassification") else "embed"
    return "generate"


def model_eos_token_ids(source: ModelSource) -> set[int]:
    """eos ids named by generation_config.json (or config.json); the tokenizer's are added by the API side."""
    gen_eos = source.generation_config.get("eos_token_id", source.config.get("eos_token_id"))
    if gen_eos is None:
        return set()
    return {int(t) for t in (gen_eos if isinstance(gen_eos, list) else [gen_eos])}


def _max_positions(source: ModelSource, hf_config: dict, pooling: bool) -> int:
    max_pos = int(hf_config.get("max_position_embeddings") or 2048)
    if pooling:
        from slicelm.models.bert import _is_roberta

        if _is_roberta(hf_config):  # XLM-R positions start after padding_idx: 8194 -> 8192 usable
            pad = hf_config.get("pad_token_id")
            max_pos -= (1 if pad is None else int(pad)) + 1
        if getattr(source, "max_seq_length", None):
            max_pos = min(max_pos, int(source.max_seq_length))
    return max_pos


class Worker:
    """One rank's device, model shard, KV cache and runner (``rank`` 0 of 1 without tensor parallelism)."""

    def __init__(self, args: EngineArgs, rank: int = 0, world_size: int = 1, init_file: str | None = None) -> None:
        assert world_size == 1 or init_file is not None, "tensor parallelism needs the process group's rendezvous"
        self.args = args
        self.rank, self.world_size, self.init_file = rank, world_size, init_file
        self._num_threads = torch.get_num_threads()  # restored at shutdown (CPU ranks share the cores)
        self.t0 = time.perf_counter()
        self.memory_plan = None
        self.elastic: ElasticKV | None = None  # KV memory in chunks (elastic KV or sleep mode)
        self.weights: WeightStore | None = None  # sleep mode: weights that can be offloaded
        self.link: BrokerLink | None = None
        self.prepaid = 0  # bytes the memory broker granted before loading (the whole slice)
        self._prepaid_seq, self._late_prepaid = 0, 0  # that request, when its grant had not come in time
        self.green_context = None

    def build(self) -> None:
        """The start-up steps, in order: device (and process group), model, KV cache (and runner)."""
        self.init_device()
        self.load_model()
        self.initialize_cache()

    # ------------------------------------------------------------------------- build steps
    def init_device(self) -> None:
        torch.manual_seed(self.args.seed)
        self.device = pick_device(self.args.device, self.rank, self.world_size)
        if self.world_size > 1:
            if self.device.type == "cpu":  # the ranks share the cores
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world_size))
            assert self.init_file is not None
            init_tp_group(self.world_size, self.rank, self.device, self.init_file)
        if self.args.green_context_sms:
            from slicelm.engine.green_context import enter_green_context

            self.green_context = enter_green_context(self.args.green_context_sms, self.device)
        if self.uses_vmm:
            self.link = BrokerLink.from_env(str(self.device))
            if self.link is not None and self.device.type == "cuda":
                from slicelm.engine import memory

                budget, _ = memory.resolve_budget(self.device, self.args.gpu_memory_budget,
                                                  self.args.gpu_memory_utilization)
                self._register(budget)  # the whole slice, before loading: borrowers give it back first

    def shutdown(self) -> None:
        if self.world_size > 1:
            destroy_tp_group()
            torch.set_num_threads(self._num_threads)

    @property
    def uses_vmm(self) -> bool:
        return self.args.elastic_kv or self.args.enable_sleep_mode

    def _register(self, guarantee: int) -> None:
        assert self.link is not None
        try:
            self.link.register(guarantee)
            self._prepaid_seq, granted = self.link.acquire(guarantee, self.link.reclaim_timeout + 2.0)
        except BrokerUnavailable as e:
            logger.warning("%s: running without the memory broker", e)
            self.link.close()
            self.link = None
            return
        self.prepaid = guarantee if granted else 0
        if granted is None:  # a late grant of it is given back (ElasticKV.pending_resident)
            self._late_prepaid = guarantee

    def load_model(self) -> None:
        """Resolves the checkpoint, infers the task, builds the model and loads (or randomizes) its weights."""
        args = self.args
        source = resolve_model(args.model, args.load_format, HubOptions.for_model(args))
        hf_config = source.config
        architectures = hf_config.get("architectures") or []
        model_cls = get_model_class(architectures)  # raises with the list of supported ones
        architecture = architectures[0]
        task = infer_task(args, architecture)
        pooling = is_pooling_architecture(architecture)
        if pooling != (task != "generate"):
            raise ValueError(f"task {task!r} does not fit architecture {architecture} of {args.model!r}")
        if self.world_size > 1 and (pooling or not getattr(model_cls, "supports_tensor_parallel", False)):
            raise ValueError(f"--tensor-parallel-size {self.world_size}: {architecture} is not sharded by slicelm "
                             "(tensor parallelism serves the decoder LLMs); use --tensor-parallel-size 1")
        dtype = resolve_dtype(args.dtype, hf_config.get("torch_dtype") or hf_config.get("dtype"), self.device)
        max_pos = _max_positions(source, hf_config, pooling)
        if args.max_model_len is not None and args.max_model_len > max_pos:
            raise ValueError(f"max_model_len={args.max_model_len} exceeds the model's maximum of {max_pos}")
        self.eos_token_ids = model_eos_token_ids(source)
        quant_config = parse_quant_config(hf_config, args.quantization)
        if quant_config is not None and pooling:
            raise QuantizationError(f"{architecture}: quantized checkpoints are supported for generative models only")
        # built on the device in the target dtype: a 30B model never passes through host memory in float32
        with torch.device(self.device), _default_dtype(dtype):
            model = self._build_model(source, model_cls, pooling, quant_config)
        self.model = cast_model(model, dtype, self.device)  # packed / fp8 tensors and scales keep their dtype
        self.quant_config = quant_config
        self._source = source
        self._load_weights()
        process_weights_after_loading(self.model)
        self.model.eval()
        self.kv_cache_dtype = KV_CACHE_DTYPES[args.kv_cache_dtype] or dtype
        if quant_config is not None or args.kv_cache_dtype != "auto":
            logger.info("quantization: %s; KV cache %s", quant_config.describe() if quant_config else "none",
                        self.kv_cache_dtype)
        self.vocab_size = int(hf_config.get("vocab_size") or getattr(self.model, "vocab_size", 0))
        self.hidden_size = int(getattr(self.model, "hidden_size", 0) or hf_config.get("hidden_size") or 0)
        names = args.served_model_name or [args.model]
        self.model_config = ModelConfig(args.model, hf_config, architecture, task, dtype,
                                        args.max_model_len or max_pos, names)

    def _load_weights(self) -> None:
        if self.args.load_format == "dummy":
            init_dummy_weights(self.model, self.args.seed)
        else:
            self.model.load_weights(self._source.iter_weights(lazy=self.world_size > 1))  # ranks read their slices

    def _build_model(self, source: ModelSource, model_cls: type, pooling: bool,
                     quant_config: QuantConfig | None) -> torch.nn.Module:
        args = self.args
        if pooling:
            from slicelm.layers.pooler import PoolingConfig

            pool_cfg = PoolingConfig.from_sentence_transformers(
                getattr(source, "st_pooling", None), pooling_type=args.pooling_type, normalize=args.normalize)
            return model_cls(source.config, pooling=pool_cfg)
        from slicelm.layers.attention import get_attention_backend

        backend = get_attention_backend(self.device, args.attention_backend, args.attention_flash_prefill,
                                        args.attention_decode_splits)
        if quant_config is not None:
            if "quant_config" not in inspect.signature(model_cls).parameters:
                raise QuantizationError(f"{model_cls.__name__} does not support quantized checkpoints")
            return model_cls(source.config, attn_backend=backend, quant_config=quant_config)
        return model_cls(source.config, attn_backend=backend)

    def initialize_cache(self) -> None:
        """Sizes and allocates the KV cache, builds the runner, and derives the scheduler limits."""
        self.max_num_batched_tokens = self._resolve_max_num_batched_tokens()
        if self.model_config.is_pooling:
            self._initialize_pooling()
        else:
            self._initialize_kv_cache()
        args, mc, cc = self.args, self.model_config, self.cache_config
        self.scheduler_config = SchedulerConfig(args.max_num_seqs, self.max_num_batched_tokens, mc.max_model_len,
                                                args.scheduling_policy)
        logger.info("loaded %s (%s, task=%s) on %s as %s in %.1fs; max_model_len=%d, KV blocks=%d",
                    mc.model, mc.architecture, mc.task, self.device, mc.dtype, time.perf_counter() - self.t0,
                    mc.max_model_len, cc.num_blocks)

    def _resolve_max_num_batched_tokens(self) -> int:
        """The step's token budget, once for every consumer (memory profile, CUDA graphs, scheduler):
        ``--max-num-batched-tokens``, else a pooling model's whole prompt (at least 8192), else vLLM's rule on the
        memory budget (``memory.default_batched_tokens``: 8192 tokens on a large GPU budget, 2048 otherwise and on the
        CPU), never fewer than ``max_num_seqs``."""
        args, max_model_len = self.args, self.model_config.max_model_len
        if self.model_config.is_pooling:
            batched = args.max_num_batched_tokens or max(max_model_len, 8192)
            if batched < max_model_len:
                raise ValueError(
                    f"max_num_batched_tokens={batched} must be >= max_model_len={max_model_len} for pooling "
                    "models (their prompts are never split)"
                )
            return batched
        from slicelm.engine import memory

        return args.max_num_batched_tokens or memory.default_batched_tokens(self._budget_bytes(), args.max_num_seqs)

    def _initialize_pooling(self) -> None:
        args = self.args
        self.cache_config = CacheConfig(args.block_size, 1, False)
        self.kv_cache = KVCacheManager(1, args.block_size, False)
        if args.enable_sleep_mode:
            self.weights = WeightStore(self.model, self.device)
        self.runner: ModelRunner | PoolingRunner = PoolingRunner(self.model, self.device)

    def _initialize_kv_cache(self) -> None:
        args, model = self.args, self.model
        max_model_len = self.model_config.max_model_len
        num_blocks, kv_caches = self._allocate_kv_cache(args, model, self.kv_cache_dtype, max_model_len)
        max_tokens_in_cache = num_blocks * args.block_size
        if max_model_len > max_tokens_in_cache:
            if args.max_model_len is not None:
                raise ValueError(
                    f"max_model_len={max_model_len} is larger than the KV cache can hold "
                    f"({num_blocks} blocks × {args.block_size} = {max_tokens_in_cache} tokens); "
                    "give the cache more memory or lower max_model_len"
                )
            logger.warning("max_model_len lowered from %d to %d to fit the KV cache",
                           max_model_len, max_tokens_in_cache)
            max_model_len = self.model_config.max_model_len = max_tokens_in_cache
        self.cache_config = CacheConfig(args.block_size, num_blocks, args.enable_prefix_caching)
        if not self.uses_vmm:
            self.kv_cache = KVCacheManager(num_blocks, args.block_size, args.enable_prefix_caching)
        if self.memory_plan is not None:
            self._cap_allocator()
        self.runner = ModelRunner(model, kv_caches, args.block_size, self.device, self.vocab_size)
        if self.elastic is not None:
            self.elastic.on_unmap = self.runner.clear_graph_block_tables
        if self.device.type == "cuda" and not args.enforce_eager:
            self.runner.enable_cuda_graphs(min(args.max_num_seqs, 512), max_model_len, self.max_num_batched_tokens,
                                           self._mixed_graph_tokens(self.max_num_batched_tokens))

    def _budget_bytes(self) -> int | None:
        """The engine's GPU memory budget (None on CPU)."""
        if self.device.type != "cuda":
            return None
        from slicelm.engine import memory

        return memory.resolve_budget(self.device, self.args.gpu_memory_budget, self.args.gpu_memory_utilization)[0]

    def _mixed_graph_tokens(self, batched: int) -> int:
        from slicelm.engine import memory

        budget = self._budget_bytes()
        assert budget is not None
        return memory.mixed_graph_tokens(budget, batched, MIXED_MAX_TOKENS)

    def make_scheduler(self) -> Scheduler:
        return Scheduler(self.scheduler_config, self.kv_cache)

    # ----------------------------------------------------------------------------- memory
    def _allocate_kv_cache(
        self, args: EngineArgs, model: torch.nn.Module, dtype: torch.dtype, max_model_len: int
    ) -> tuple[int, list[torch.Tensor]]:
        bs = args.block_size
        shape = lambda n: (2, n, bs, model.num_kv_heads, model.head_dim)
        bytes_per_block = 2 * model.num_layers * bs * model.num_kv_heads * model.head_dim * dtype.itemsize
        self.memory_plan = None
        if self.device.type == "cuda":
            num_blocks = self._plan_gpu_memory(args, model, dtype, bytes_per_block, shape)
        elif args.num_gpu_blocks_override is not None:
            num_blocks = args.num_gpu_blocks_override
        elif args.kv_cache_memory_bytes is not None:
            num_blocks = int(args.kv_cache_memory_bytes) // bytes_per_block
        else:
            # CPU: as much as the byte budget allows, but no more than every sequence at full length.
            needed = args.max_num_seqs * cdiv(max_model_len, bs) + 1
            num_blocks = min(needed, args.cpu_kv_cache_bytes // bytes_per_block)
        num_blocks = get_tp_group().min_int(num_blocks)  # every rank holds the same blocks
        if num_blocks < 1:
            raise ValueError("not enough memory for a single KV cache block")
        if self.uses_vmm:
            return self._build_elastic_kv(num_blocks, dtype)
        kv_caches = [torch.zeros(shape(num_blocks), dtype=dtype, device=self.device) for _ in range(model.num_layers)]
        return num_blocks, kv_caches

    def _build_elastic_kv(self, num_blocks: int, dtype: torch.dtype) -> tuple[int, list[torch.Tensor]]:
        """KV tensors over a virtual range (``PagedKVMemory``) and the controller that maps its chunks; the
        guarantee is ``num_blocks`` rounded down to whole chunks (returned with the tensors)."""
        args, model = self.args, self.model
        if args.enable_sleep_mode:  # before any KV is mapped: packing briefly holds a piece beside the weights
            self.weights = WeightStore(model, self.device)
        layout = KVLayout(model.num_layers, args.block_size, model.num_kv_heads, model.head_dim, dtype)
        plan = self.memory_plan
        resident = plan.budget_bytes - plan.kv_bytes if plan is not None else 0
        max_bytes = args.elastic_kv_max_bytes
        if max_bytes is None and args.elastic_kv and self.link is not None:
            total = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" \
                else 4 * num_blocks * layout.block_bytes
            max_bytes = max(0, total - resident)
        max_blocks = max(num_blocks, (max_bytes or 0) // layout.block_bytes)
        kv_memory = PagedKVMemory(layout, max_blocks, self.device)
        guarantee = num_blocks // kv_memory.chunk_blocks * kv_memory.chunk_blocks
        if guarantee < 1:
            raise ValueError(f"not enough memory for one KV chunk of {kv_memory.chunk_blocks} blocks "
                             f"({kv_memory.chunk_bytes >> 20} MiB); raise the budget or drop --elastic-kv")
        if self.link is not None and self.device.type != "cuda":  # a CPU engine's guarantee is its KV cache
            self._register(guarantee * layout.block_bytes)
        self.kv_cache = KVCacheManager(kv_memory.max_blocks, args.block_size, args.enable_prefix_caching,
                                       num_present=0)
        self.elastic = ElasticKV(kv_memory, self.kv_cache, guarantee, resident, self.link, args.elastic_kv,
                                 args.elastic_kv_watermark)
        if self._late_prepaid:
            self.elastic.pending_resident[self._prepaid_seq] = self._late_prepaid
        self.elastic.start(self.prepaid)
        return guarantee, kv_memory.kv_caches

    def _cap_allocator(self) -> None:
        """Caps torch's allocator at the budget less what lives outside it (virtual-memory KV and weights)."""
        from slicelm.engine import memory

        plan = self.memory_plan
        assert plan is not None
        outside = (self.elastic.guarantee_bytes if self.elastic is not None else 0) + \
            (self.weights.mapped_bytes if self.weights is not None else 0)
        memory.cap_allocator(self.device, plan.budget_bytes - outside, plan.non_torch_bytes)

    def _plan_gpu_memory(self, args, model, dtype, bytes_per_block, shape) -> int:
        """Profiles the largest step on a one-block cache, then gives the rest of the budget to KV."""
        from slicelm.engine import memory

        batched = self.max_num_batched_tokens
        torch.cuda.set_per_process_memory_fraction(1.0, self.device)  # a previous engine's cap must not apply
        dummy = [torch.zeros(shape(1), dtype=dtype, device=self.device) for _ in range(model.num_layers)]
        runner = ModelRunner(model, dummy, args.block_size, self.device, self.vocab_size)
        # the largest step, as a real one runs it (same token count, hence the same kernels: large-M linears
        # allocate their shared dequantization scratch here, once, and it stays — counted with the weights)
        activation = self._profile_peak(functools.partial(runner.profile_run, batched, min(args.max_num_seqs, batched)))
        widest = max((m.out_features for m in model.modules() if isinstance(m, Linear)), default=0)
        activation += memory.fragmentation_allowance(batched, widest, self.model_config.dtype.itemsize)
        graph_pool = 0 if args.enforce_eager else self._graph_pool_bytes(runner, batched)
        del runner, dummy
        torch.cuda.empty_cache()
        plan = memory.plan_memory(self.device, args.gpu_memory_budget, args.gpu_memory_utilization,
                                  bytes_per_block, activation, graph_pool)
        if args.kv_cache_memory_bytes is not None or args.num_gpu_blocks_override is not None:
            wanted = args.num_gpu_blocks_override or int(args.kv_cache_memory_bytes) // bytes_per_block
            if wanted > plan.num_blocks:
                raise memory.MemoryBudgetError(
                    f"{wanted} KV blocks were asked for but only {plan.num_blocks} fit: {plan.describe()}")
            plan.num_blocks, plan.kv_bytes = wanted, wanted * bytes_per_block
        logger.info(plan.describe())
        self.memory_plan = plan
        return plan.num_blocks

    def _graph_pool_bytes(self, runner: ModelRunner, batched: int) -> int:
        """The reserve for the largest graph's tensors (decode batch, or the largest mixed step captured): the
        model and LM head, not the sampler (it runs outside)."""
        from slicelm.engine import memory

        max_num_seqs = self.args.max_num_seqs
        graph_tokens, mixed = max_num_seqs, supports_mixed_graphs(self.model)
        if mixed:
            graph_tokens = max(graph_tokens, self._mixed_graph_tokens(batched))
        step = functools.partial(runner.profile_run, graph_tokens, min(max_num_seqs, 512), sample=False)
        return memory.graph_pool_reserve(self._profile_peak(step), mixed)

    def _profile_peak(self, step: Callable[[], None]) -> int:
        """Bytes that ``step`` holds at its peak beyond what stays allocated after it (persistent buffers
        it creates are in ``memory_allocated`` at planning time already). The allocator's peak *reserved*
        growth when larger: the plan caps the allocator, so its rounding and splitting count too."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        allocated, reserved = torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        step()
        persistent = torch.cuda.memory_allocated(self.device) - allocated
        peak = torch.cuda.max_memory_allocated(self.device) - allocated - persistent
        peak_reserved = torch.cuda.max_memory_reserved(self.device) - reserved - persistent
        return max(peak, peak_reserved)

    # ------------------------------------------------------------------------------ sleep mode
    def sleep(self, level: int) -> None:
        """Drops the KV cache and offloads (level 1) or discards (level 2) the weights; nothing may run."""
        if self.elastic is not None:
            self.elastic.release_all()
        if self.weights is not None:
            nbytes = self.weights.mapped_bytes
            self.weights.offload(keep_params=level == 1)
            if self._weights_in_books:
                self.elastic.release_resident(nbytes)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def _weights_in_books(self) -> bool:
        """The broker counts the weights in a GPU engine's share (its budget); a CPU engine's share is its KV."""
        return self.elastic is not None and self.memory_plan is not None

    def discard_offloaded_weights(self) -> None:
        """A level-2 sleep after a level-1 one: the host copy of the parameters is no longer kept."""
        if self.weights is not None:
            self.weights.kept_params = False

    def wake_weights(self, reload: bool) -> None:
        if self.weights is None:
            return
        if self._weights_in_books and not self.elastic.acquire_resident(self.weights.range.size):
            raise RuntimeError("the memory broker did not give the weights' memory back in time; retry the wake-up")
        self.weights.restore()
        if reload:
            with torch.no_grad():
                self._load_weights()

    def wake_kv_cache(self) -> None:
        if self.elastic is not None:
            self.elastic.restore()

    def execute_model(self, sched: SchedulerOutput, prev: StepHandle | None = None,
                      grammar_bitmask: BitmaskFn | None = None) -> StepHandle:
        assert isinstance(self.runner, ModelRunner)
        return self.runner.execute_model(sched, prev, grammar_bitmask)

    def execute_pooling(self, sched: SchedulerOutput) -> list[torch.Tensor]:
        assert isinstance(self.runner, PoolingRunner)
        return self.runner.execute(sched)
