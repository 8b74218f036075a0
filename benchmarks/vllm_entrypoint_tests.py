"""vLLM's own entrypoint tests run against slicelm: pass / fail counts and each remaining incompatibility.

Needs a vLLM source checkout (its tests and its Python package import; nothing of it is built) and vLLM's
pure-Python import dependencies that slicelm's venv lacks (``pip install --target DIR cbor2 pybase64
openai-harmony mistral-common partial-json-parser pydantic-extra-types regex tiktoken einops
py-cpuinfo cachetools pillow pytest-asyncio``), passed as ``--extra-site DIR``:

    python benchmarks/vllm_entrypoint_tests.py --vllm-src ~/vllm --extra-site ~/vllm-deps           # all families
    python benchmarks/vllm_entrypoint_tests.py --vllm-src ~/vllm --extra-site ~/vllm-deps --family pooling
    python benchmarks/vllm_entrypoint_tests.py --vllm-src ~/vllm --summarize                        # runs so far

Each family is one pytest run (junit XML under ``--work``/runs) of vLLM's test files under
``tests/entrypoints`` (``FAMILIES``), with ``benchmarks/vllm_harness`` standing in for vLLM's
``tests/utils.py`` / ``tests/conftest.py``: ``RemoteOpenAIServer`` starts ``slicelm serve`` on the CPU with a
local substitute of the model the test names (``substitutions.py``). Tests of features slicelm does not
have (``OUT_OF_SCOPE``) and tests the substitute model cannot answer (``NOT_COMPARABLE``) are listed apart,
not counted; tests of vLLM's own in-process code (``NOT_RUN``) are not run; every other failure is an
incompatibility. Each run records the slicelm commit, date and wall time it ran at (``runs/FAMILY.json``);
the summary (``benchmarks/results/vllm_entrypoint_tests.json``) has every family run under ``--work`` so
far, each with its run record and tally, then the tally over all of them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment

REPO = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).resolve().parent / "vllm_harness"
FAMILIES = {  # vLLM's tests/entrypoints/... files, per family
    "chat": ["openai/chat_completion/test_batched_chat_completions.py", "openai/chat_completion/test_chat.py",
             "openai/chat_completion/test_chat_completion.py", "openai/chat_completion/test_chat_echo.py",
             "openai/chat_completion/test_chat_logit_bias_validation.py",
             "openai/chat_completion/test_enable_force_include_usage.py",
             "openai/chat_completion/test_extra_content_fields.py", "openai/chat_completion/test_logprob_token_ids.py",
             "openai/chat_completion/test_root_path.py"],
    "completion": ["openai/completion/test_completion.py", "openai/completion/test_prompt_validation.py",
                   "openai/completion/test_token_in_token_out.py", "openai/models/test_models.py",
                   "openai/test_chunked_prompt.py", "openai/test_return_token_ids.py",
                   "openai/test_return_tokens_as_ids.py"],
    "pooling": ["pooling/basic/test_truncation.py", "pooling/classify/test_online.py", "pooling/embed/test_online.py",
                "pooling/embed/test_online_dimensions.py", "pooling/embed/test_online_long_text.py",
                "pooling/embed/test_cohere_online.py", "pooling/embed/test_cohere_openai_parity.py",
                "pooling/scoring/test_bi_encoder_online.py", "pooling/scoring/test_cross_encoder_online.py",
                "pooling/token_classify/test_online.py", "pooling/token_embed/test_online.py"],
    "serve": ["serve/instrumentator/test_basic.py", "serve/instrumentator/test_metrics.py",
              "serve/instrumentator/test_orca_metrics.py", "serve/instrumentator/test_uds.py",
              "serve/middleware/test_optional_middleware.py", "serve/tokenize/test_tokenization.py"],
}
NOT_RUN = {  # tests of vLLM's in-process code (no server: they would pass or fail on vLLM, not slicelm)
    "serve/middleware/test_cors_middleware.py": "vLLM's CORS middleware on a FastAPI TestClient",
    "serve/instrumentator/test_basic.py::test_health_check_engine_dead_error": "vLLM's health() on a mock engine",
    **{f"openai/chat_completion/test_batched_chat_completions.py::test_{t}": "vLLM's batch serving on a mock engine"
       for t in ("batched_echo_does_not_prepend_user_prompt", "batched_echo_prepends_matching_assistant_prefix",
                 "batched_harmony_response_format_uses_structural_tag", "batch_rejects_kv_transfer_prompt_token_ids",
                 "batched_parser_receives_each_prompt_prefix", "batched_reasoning_wiring_matches_single_chat")},
    **{f"openai/chat_completion/test_chat.py::test_{t}": "vLLM's ChatCompletionRequest -> SamplingParams"
       for t in ("chat_completion_request_n_parameter", "null_top_logprobs_is_same_as_omitted",
                 "chat_completion_request_accepts_model_specific_reasoning_effort",
                 "chat_completion_request_rejects_unknown_reasoning_effort")},
    **{f"openai/chat_completion/test_logprob_token_ids.py::test_{t}": "vLLM's request models -> SamplingParams"
       for t in ("chat_request_decouples_top_k_from_explicit_token_ids",
                 "completion_request_decouples_top_k_from_explicit_token_ids",
                 "completion_rejects_explicit_token_ids_without_generated_tokens",
                 "requests_reject_explicit_token_ids_with_beam_search")},
    **{f"openai/completion/test_completion.py::test_completion_request_{t}": "vLLM's CompletionRequest model"
       for t in ("bad_words_to_sampling_params", "bad_words_default_empty", "forwards_routed_experts_prompt_start")},
    "openai/completion/test_prompt_validation.py::test_load_prompt_embeds": "vLLM's safe_load_prompt_embeds",
    "openai/completion/test_prompt_validation.py::test_disable_prompt_embeds": "vLLM's safe_load_prompt_embeds",
}
OUT_OF_SCOPE = [  # (pattern on the test id, why): tests of features slicelm does not have, not counted
    (r"lora|test_models::test_check_models", "LoRA adapters"),  # test_check_models: the LoRA modules listed
    (r"image|vision|audio|video|multimodal|mm_", "multimodal inputs"),
    (r"beam", "beam search"),
    (r"prompt_embeds", "prompt embeddings"),
    (r"reasoning|thinking|harmony", "reasoning parsers"),
    (r"responses_api|/v1/responses", "Responses API"),
    (r"quantiz|fp8|awq|gptq", "quantization"),
    (r"token_embed|token_classify|late_chunking", "token-level pooling"),
    (r"hf.overrides|trust.remote.code|matryoshka", "--trust-remote-code / --hf-overrides (refused at start: slicelm "
     "runs no model code from the Hub and does not override model configs)"),
    (r"run_batch", "vLLM's run-batch launcher (OpenAI batch files)"),
]
OUT_OF_SCOPE_TEXT = [  # (pattern on a failure's text, why): slicelm refusing a feature it does not have
    (r"beam search is not supported", "beam search"),
    (r"prompt embeddings are not supported|--enable-prompt-embeds", "prompt embeddings"),
    (r"multimodal inputs are not supported|content part type '(image_url|input_audio|audio_url|video_url)'",
     "multimodal inputs"),
    (r"LoRA adapters are not supported|--enable-lora", "LoRA adapters"),
    (r"trust.remote.code|hf.overrides", "--trust-remote-code / --hf-overrides (refused at start: slicelm runs no "
     "model code from the Hub and does not override model configs)"),
    (r"LocalEntryNotFoundError", "needs a Hub download (the named model's weights; offline)"),
]


NOT_COMPARABLE = [  # (pattern on the test id, why the substitute model cannot give the named model's answer)
    (r"classify\.test_online::test_basic|test_cross_encoder_online::test_basic",
     "compares token ids of the named model's tokenizer; the substitute has MiniLM's"),
    (r"test_bi_encoder_online::test_pooling_embed", "expects the named model's 768 dimensions; MiniLM has 384"),
    (r"test_cross_encoder_online::test_rerank_api_(texts|top_n)",
     "expects a trained reranker's scores; the substitute cross-encoder has random weights"),
    (r"test_completion::test_completion_streaming|test_completion::test_parallel_(no_)?streaming"
     r"|test_return_token_ids::test_comparison_with_prompt_logprobs_and_logprobs",
     "expects the named model to keep generating; SmolLM2-135M-Instruct's most likely first token after a bare "
     "question is <|im_end|> (p = 0.39 after 'What is an LLM?', 0.23 after 'Hello, world! How are you today?'): "
     "finish_reason 'stop' within max_tokens, empty answers repeat among n samples, and an answer of only "
     "<|im_end|> has text '' that cannot end with the decoded token ids"),
    (r"test_chat::test_more_than_one_prompt_logprobs_chat",
     "expects the named model to rank the 4th prompt token first (one entry with prompt_logprobs=1); in the "
     "substitute's chat template that token ('You') ranks 6th, so it comes with the top-1: two entries"),
    (r"test_chat::test_single_chat_session\[HuggingFaceH4", "expects zephyr's chat template: 37 prompt tokens"),
    (r"test_chat::test_structured_outputs_(choice|regex)_chat",
     "expects the named model to answer 'pick another one' / 'a different one' with another choice / IP; SmolLM2 "
     "repeats its first answer (both answers match the constraint)"),
    (r"test_chat::test_response_format_json_(object|schema)|test_chat::test_complex_message_content",
     "expects the named model's arithmetic ({'result': 2} / '2'); SmolLM2's JSON is valid but its sum is not, "
     "and it answers '1 + 1 = 2'"),
    (r"test_chat::test_custom_role",
     "no max_tokens: SmolLM2's greedy answer under the custom role did not end within the client's 600 s on the "
     "shared 2-core machine (the named model ends its answer)"),
    (r"test_extra_content_fields::test_translategemma_extra_lang_code_fields",
     "expects TranslateGemma's chat template (it reads source_lang_code / target_lang_code on the content part) "
     "and a Spanish translation (its server flags --chat-template-content-format / --limit-mm-per-prompt are "
     "refused by slicelm)"),
    (r"test_return_token_ids::test_chat_completion_with_tool_use",
     "expects Qwen2.5 to answer with a hermes <tool_call> for get_weather; SmolLM2's chat template does not show "
     "tools to the model, which answers in prose"),
    (r"test_return_tokens_as_ids::test_chat_return_tokens_as_token_ids_completion",
     "SmolLM2's 8th (last) token is the first half of an emoji: the text holds those bytes back, as vLLM's "
     "detokenizer does, so it cannot equal the decode of all 8 ids, which ends in U+FFFD (the named model's 8 "
     "tokens end on a character boundary)"),
    (r"classify\.test_online::test_completion_request_batched",
     "expects the named model's labels (Default / Spoiled); the substitute has LABEL_0 / LABEL_1"),
    (r"classify\.test_online::test_(completion_request|chat_request)\[",
     "sends the named model's token ids (Qwen2.5's: 33808 is outside the substitute BERT's 30522-token vocabulary) "
     "and expects its chat token counts (51 / 54)"),
    (r"embed\.test_online::test_(basic|completion_request|completion_request_batched|chat_request)\[",
     "expects multilingual-e5-small's token ids and counts (XLM-R's tokenizer: 17 tokens for the input, 33 for "
     "the chat); the substitute MiniLM has BERT's"),
    (r"test_basic::test_request_cancellation",
     "asks for 10,000 new tokens; the substitute SmolLM2's context is 8,192 (the named Qwen3-0.6B's is 40,960)"),
]


def build_root(vllm_src: Path, work: Path) -> Path:
    """A copy of vLLM's entrypoint tests with the harness files in place of vLLM's test utilities."""
    root = work / "root"
    src = vllm_src / "tests" / "entrypoints"
    dst = root / "tests" / "entrypoints"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "conftest.py"):
        shutil.copy(src / name, dst / name)
    for family_dir in {f.split("/")[0] for files in FAMILIES.values() for f in files}:
        shutil.copytree(src / family_dir, dst / family_dir, dirs_exist_ok=True)
    (root / "tests" / "__init__.py").write_text(  # what the shims do not replace comes from vLLM's tests tree
        f"__path__.append({str((vllm_src / 'tests').resolve())!r})\n")
    for shim, name in (("conftest_shim.py", "conftest.py"), ("utils_shim.py", "utils.py"),
                       ("substitutions.py", "substitutions.py")):
        shutil.copy(HARNESS / shim, root / "tests" / name)
    (root / "pytest.ini").write_text("[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
                                     "addopts = -p no:cacheprovider\nmarkers =\n    core_model\n    slow_test\n"
                                     "    cpu_model\n    skip_v1\n    timeout\n")
    return root


def run_family(family: str, root: Path, work: Path, vllm_src: Path, extra_site: Path | None) -> Path:
    """One pytest run; ``runs/FAMILY.json`` records the slicelm commit, date and wall time it ran at.
    ``--tb=native``: pytest's own traceback formatting re-parses test sources, which crashed the run
    (CPython 3.11's "AST constructor recursion depth mismatch") after a deep failure."""
    xml = work / "runs" / f"{family}.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    paths = [vllm_src.resolve(), *([extra_site.resolve()] if extra_site else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (root, *paths)), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "SLICELM_TREE": str(REPO), "SLICELM_PYTHON": sys.executable,
           "HARNESS_MODELS": str(work / "models"), "HARNESS_LOG_DIR": str(work / "logs"), "VLLM_SRC": str(vllm_src)}
    files = [f"tests/entrypoints/{f}" for f in FAMILIES[family]]
    deselect = [f"--deselect=tests/entrypoints/{t}" for t in NOT_RUN if t.split("::")[0] in FAMILIES[family]]
    cmd = [sys.executable, "-m", "pytest", "-q", "--tb=native", f"--junitxml={xml}", *deselect, *files]
    print(f"[{family}] {' '.join(cmd)}", flush=True)
    run = environment()
    start = time.monotonic()
    subprocess.run(cmd, cwd=root, env=env, check=False)
    run |= {"wall_s": round(time.monotonic() - start, 1), "vllm_source": vllm_version(vllm_src)}
    (work / "runs" / f"{family}.json").write_text(json.dumps(run, indent=2) + "\n")
    return xml


def classify(tc: ET.Element) -> tuple[str, str, str | None, str]:
    """``(test id, status, out-of-scope reason or None, first line of the failure)``."""
    tid = f"{tc.get('classname')}::{tc.get('name')}"
    status, text = "passed", ""
    for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
        el = tc.find(tag)
        if el is not None:
            status, text = name, (el.get("message") or "") + "\n" + (el.text or "")
            break
    if status == "error" and text.startswith("failed on teardown"):  # the test itself passed
        return tid, "passed-teardown-error", None, ""
    if status == "passed":  # a pass counts whatever feature the test names
        return tid, status, None, ""
    reason = None
    for pattern, why in NOT_COMPARABLE:
        if status in ("failed", "error") and re.search(pattern, tid):
            return tid, status, f"substitute model: {why}", text.strip().splitlines()[0][:300] if text.strip() else ""
    for pattern, why in OUT_OF_SCOPE:
        if re.search(pattern, tid.lower()):
            reason = why
            break
    for pattern, why in OUT_OF_SCOPE_TEXT if reason is None else ():
        if re.search(pattern, text[:4000]):
            reason = why
            break
    first = next((line for line in text.strip().splitlines() if line.strip()), "")
    return tid, status, reason, first[:300]


Row = tuple[str, str, str | None, str]  # (family, status, out-of-scope / not-comparable reason, first line)


def read_family(work: Path, family: str) -> tuple[dict[str, Row], int]:
    """The family's rows by test id, and its harness teardown errors (a test that passed, then its fixture's
    teardown failed: counted apart, not as the test's outcome)."""
    rows: dict[str, Row] = {}
    teardown = 0
    for tc in ET.parse(work / "runs" / f"{family}.xml").getroot().iter("testcase"):
        tid, status, reason, first = classify(tc)
        if status == "passed-teardown-error":
            teardown += 1
            status = "passed"
        if tid not in rows or rows[tid][1] == "passed":
            rows[tid] = (family, status, reason, first)
    return rows, teardown


def tally(rows: dict[str, Row], teardown: int) -> dict[str, Any]:
    """Counts, out-of-scope features, not-comparable tests and incompatibilities of ``rows``."""
    counted = {t: r for t, r in rows.items() if r[2] is None and r[1] != "skipped"}
    counts = collections.Counter(r[1] for r in counted.values())
    out_of_scope = collections.Counter(r[2] for r in rows.values()
                                       if r[2] is not None and not r[2].startswith("substitute model"))
    not_comparable = [{"test": t, "reason": r[2]} for t, r in rows.items()
                      if r[2] is not None and r[2].startswith("substitute model")]
    return {
        "counts": {"tests": len(rows), "passed": counts["passed"], "failed": counts["failed"] + counts["error"],
                   "skipped": sum(r[1] == "skipped" for r in rows.values()),
                   "out_of_scope": sum(out_of_scope.values()), "not_comparable": len(not_comparable),
                   "harness_teardown_errors": teardown},
        "out_of_scope_by_feature": dict(out_of_scope),
        "not_comparable": not_comparable,
        "incompatibilities": [{"test": t, "status": r[1], "reason": r[3]} for t, r in counted.items()
                              if r[1] != "passed"],
        "skipped_tests": [{"test": t, "reason": r[3]} for t, r in rows.items() if r[1] == "skipped" and r[2] is None],
    }


def summarize(work: Path, families: list[str], vllm_src: Path) -> dict[str, Any]:
    """Every family run under ``work``: per family the commit / date / wall time it ran at and its tally, then
    the tally over all of them."""
    rows: dict[str, Row] = {}
    teardown = 0
    per_family: dict[str, Any] = {}
    for family in families:
        if not (work / "runs" / f"{family}.xml").exists():
            continue
        family_rows, family_teardown = read_family(work, family)
        meta = work / "runs" / f"{family}.json"
        run = json.loads(meta.read_text()) if meta.exists() else {"commit": "unknown", "date": "unknown"}
        per_family[family] = {"run": run, "test_files": FAMILIES[family], **tally(family_rows, family_teardown)}
        teardown += family_teardown
        for tid, row in family_rows.items():
            if tid not in rows or rows[tid][1] == "passed":
                rows[tid] = row
    return {
        "benchmark": "vllm_entrypoint_tests", **environment(),
        "vllm_source": vllm_version(vllm_src),
        "families_measured": list(per_family),
        "not_run": [{"test": t, "reason": why} for t, why in NOT_RUN.items()],
        **tally(rows, teardown),
        "families": per_family,
    }


def vllm_version(vllm_src: Path) -> str:
    pkg = vllm_src / "PKG-INFO"
    if pkg.exists():
        m = re.search(r"^Version: (.+)$", pkg.read_text(), re.M)
        if m:
            return m.group(1)
    try:
        return subprocess.check_output(["git", "describe", "--tags", "--always"], cwd=vllm_src, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-src", type=Path, required=True, help="a vLLM source checkout")
    ap.add_argument("--extra-site", type=Path, default=None, help="vLLM's import dependencies (pip --target)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slicelm-vllm-harness"))
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES), help="default: every family")
    ap.add_argument("--summarize", action="store_true", help="only summarize the runs under --work")
    ap.add_argument("--name", default="vllm_entrypoint_tests", help="result file name ('' to print only)")
    args = ap.parse_args()
    families = args.family or list(FAMILIES)
    if not args.summarize:
        from vllm_harness.models import write_models

        root = build_root(args.vllm_src, args.work)
        write_models(args.work / "models")
        for family in families:
            run_family(family, root, args.work, args.vllm_src, args.extra_site)
    result = summarize(args.work, list(FAMILIES), args.vllm_src)  # every family run under --work so far
    print({k: result[k] for k in ("families_measured", "counts", "out_of_scope_by_feature")})
    for family, block in result["families"].items():
        print(f"{family}: {block['run'].get('commit', '?')[:10]} {block['run'].get('date')} {block['counts']}")
    for row in result["incompatibilities"]:
        print(f"{row['status']:6} {row['test']} | {row['reason'][:160]}")
    if args.name:
        path = RESULTS / f"{args.name}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
