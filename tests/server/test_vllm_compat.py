"""vLLM's OpenAI surface as vLLM's own entrypoint tests expect it (our tests, vLLM's behaviour)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import MODEL, Server, start_server, stop_server

pytestmark = pytest.mark.slow
MSG = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("compat"), "--max-model-len", "1024", "--max-num-seqs", "8",
                     "--enable-prompt-tokens-details", "--enable-request-id-headers", "--enable-force-include-usage",
                     "--enable-per-request-metrics",
                     "--enable-server-load-tracking",
                     "--max-logprobs", "30", "--enable-tokenizer-info-endpoint", "--enable-chunked-prefill",
                     "--show-hidden-metrics-for-version", "0.9", "--api-server-count", "1", "--root-path", "/api",
                     timeout=600)  # a loaded 2-core machine takes minutes to start it
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x")


def test_usage_details_and_request_id_header(srv: Server, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=2,
                                                           extra_headers={"X-Request-Id": "my-id-1"})
    assert raw.headers["x-request-id"] == "my-id-1"  # vLLM echoes the client's header
    out = raw.parse()
    assert out.usage.prompt_tokens_details is not None and out.usage.prompt_tokens_details.cached_tokens >= 0
    assert out.model_extra.get("prompt_logprobs", "missing") is None


def test_request_id_header_on_every_response_and_load(srv: Server, client: openai.OpenAI) -> None:
    """As vLLM's middleware: the client's ``X-Request-Id`` or a uuid hex, on every route and status."""
    api = srv.url  # (--root-path /api: the proxy strips it)
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")):
        r = httpx.request(method, api + path, json={"model": "nope"} if method == "POST" else None)
        assert len(r.headers["x-request-id"]) == 32, (path, r.headers)
        assert httpx.request(method, api + path, headers={"X-Request-Id": "Custom"},
                             json={"model": "nope"} if method == "POST" else None).headers["x-request-id"] == "Custom"
    assert httpx.get(api + "/load").json() == {"server_load": 0}


def test_vllm_response_keys_and_texts(client: openai.OpenAI) -> None:
    """Every key of vLLM's choices and usage; vLLM's texts for the prompt and chat-flag errors."""
    c = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).model_dump()
    assert {"token_ids", "prompt_token_ids", "prompt_logprobs", "stop_reason"} <= set(c["choices"][0])
    assert c["choices"][0]["prompt_token_ids"] is None and "completion_tokens_details" in c["usage"]
    chat = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2,
                                          extra_body={"return_token_ids": True}).model_dump()
    assert chat["prompt_token_ids"] and chat["choices"][0]["token_ids"]
    assert set(chat["usage"]["prompt_tokens_details"]) >= {"cached_tokens", "created_cache_tokens"}
    empty = re.escape("Either prompt or prompt_embeds must be provided and non-empty.")
    for prompt in ("", None):
        with pytest.raises(openai.BadRequestError, match=empty):
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    both = re.escape("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    with pytest.raises(openai.BadRequestError, match=both):
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": True})
    with pytest.raises(openai.BadRequestError, match="int_parsing"):
        client.completions.create(model=MODEL, prompt="x", max_tokens="many")  # type: ignore[arg-type]


def test_forced_usage_on_every_streamed_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, stream=True))
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].usage.completion_tokens == sum(len(c.model_extra.get("token_ids") or []) for c in chunks) or \
        chunks[-1].usage.completion_tokens >= 1
    done = [c.usage.completion_tokens for c in chunks]
    assert done == sorted(done)


def test_extra_fields_custom_roles_and_lax_coercions(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, max_tokens=2,
                                         messages=[{"role": "narrator", "content": "x"}, *MSG],  # type: ignore
                                         extra_body={"unknown_field": 1, "logprobs": "true", "top_logprobs": 2})
    assert out.choices[0].logprobs is not None and len(out.choices[0].logprobs.content[0].top_logprobs) == 2
    with pytest.raises(openai.BadRequestError, match="max allowed: 30"):
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, logprobs=True,
                                       extra_body={"top_logprobs": -1})
    # tools and response_format are served (structured outputs); a malformed one is a 400 naming the field
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2,
                                       extra_body={"response_format": {"type": "json_schema"}})


def test_logprobs_zero_and_token_ids(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, logprobs=0, temperature=0,
                                    extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    c = out.choices[0]
    assert len(c.logprobs.token_logprobs) == 3 and all(x is not None for x in c.logprobs.token_logprobs)
    assert all(len(d) == 1 for d in c.logprobs.top_logprobs)
    assert all(t.startswith("token_id:") for t in c.logprobs.tokens)
    assert c.model_extra["token_ids"] and c.model_extra["prompt_token_ids"]
    assert [int(t.split(":")[1]) for t in c.logprobs.tokens] == c.model_extra["token_ids"]


def test_streaming_n2_one_choice_per_chunk_and_forced_usage(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, n=2, stream=True,
                                            temperature=1.0, seed=1))
    assert all(len(c.choices) == 1 for c in chunks[:-1])
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_error_types_and_messages(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="out of vocabulary") as e:
        client.completions.create(model=MODEL, prompt=[999999], max_tokens=2)
    assert e.value.body["type"] == "BadRequestError"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert nf.value.body["type"] == "NotFoundError"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, seed=2**63)


def test_tokenize_token_strs_tools_and_tokenizer_info(srv: Server) -> None:
    r = httpx.post(srv.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["token_strs"] is None and r["count"] == len(r["tokens"])
    r = httpx.post(srv.url + "/tokenize", json={"prompt": "Hello", "return_token_strs": True}).json()
    assert isinstance(r["token_strs"], list)
    r = httpx.post(srv.url + "/tokenize", json={"messages": MSG, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]})
    assert r.status_code == 200
    info = httpx.get(srv.url + "/tokenizer_info").json()
    assert isinstance(info["tokenizer_class"], str) and isinstance(info["added_tokens_decoder"], dict)
    assert isinstance(info["model_max_length"], int) and isinstance(info["eos_token"], str)


def test_invocations_orca_and_root_path(srv: Server) -> None:
    r = httpx.post(srv.url + "/invocations", json={"model": MODEL, "messages": MSG, "max_tokens": 2},
                   headers={"endpoint-load-metrics-format": "TEXT"})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert r.headers["endpoint-load-metrics"].startswith("TEXT named_metrics.kv_cache_usage_perc=")
    r = httpx.post(srv.url + "/invocations", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                   headers={"endpoint-load-metrics-format": "JSON"})
    assert r.json()["object"] == "text_completion"
    assert "num_requests_waiting" in json.loads(r.headers["endpoint-load-metrics"][5:])["named_metrics"]
    # --root-path: the app knows its public prefix, and routes a request with or without it (as vLLM's FastAPI
    # root_path: a proxy may strip /api or leave it on)
    assert httpx.get(srv.url + "/openapi.json").json()["servers"] == [{"url": "/api"}]
    for prefix in ("", "/api"):
        assert httpx.get(srv.url + prefix + "/v1/models").json()["data"][0]["id"] == MODEL, prefix


def test_vllm_metrics(srv: Server) -> None:
    text = httpx.get(srv.url + "/metrics").text
    for name in ("vllm:iteration_tokens_total_bucket", "vllm:request_params_n_bucket",
                 "vllm:request_params_max_tokens_bucket"):
        assert name in text, name
    assert f'vllm:num_requests_waiting_by_reason{{engine="0",model_name="{MODEL}",reason="capacity"}}' in text
    assert 'le="16384.0"' in text and 'vllm:request_params_n_bucket{engine="0",le="20.0"' in text


def test_refused_flags(tmp_path_factory: pytest.TempPathFactory) -> None:
    for flags, needle in ((("--api-server-count", "2", "--no-engine-process"), "--no-engine-process"),
                          (("--enable-lora",), "--enable-lora")):
        with pytest.raises(RuntimeError, match=needle):
            start_server(tmp_path_factory.mktemp("refused"), *flags, timeout=60)


def test_prompt_logprobs_chat(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1, extra_body={"prompt_logprobs": 2})
    plp = out.model_extra["prompt_logprobs"]
    assert len(plp) == out.usage.prompt_tokens and plp[0] is None
    for entry in plp[1:]:
        assert 1 <= len(entry) <= 3
        for tid, lp in entry.items():
            assert int(tid) >= 0 and set(lp) == {"logprob", "rank", "decoded_token"}
            assert lp["logprob"] <= 0.0 and lp["rank"] >= 1 and isinstance(lp["decoded_token"], str)
        assert sorted(lp["rank"] for lp in entry.values())[:2] == [1, 2]  # the top-2, and the token


def test_prompt_logprobs_agree_with_sampled_logprobs(client: openai.OpenAI) -> None:
    """The logprobs a prompt's tokens get as prompt_logprobs are those the same tokens got when sampled."""
    gen = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                    logprobs=0, extra_body={"return_token_ids": True})
    c = gen.choices[0]
    ids = c.model_extra["prompt_token_ids"] + c.model_extra["token_ids"]
    runs = [client.completions.create(model=MODEL, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 1})
            for _ in range(2)]  # the second would hit the prefix cache: prompt_logprobs requests skip it
    plp = runs[0].choices[0].model_extra["prompt_logprobs"]
    assert runs[1].choices[0].model_extra["prompt_logprobs"] == plp
    assert len(plp) == len(ids) and plp[0] is None
    for pos, sampled in zip(range(len(ids) - 4, len(ids)), c.logprobs.token_logprobs):
        own = plp[pos][str(ids[pos])]
        assert own["rank"] == 1 and own["logprob"] == pytest.approx(sampled, abs=2e-2)  # greedy: the top token


def test_echo_logprobs_give_prompt_tokens_logprobs(client: openai.OpenAI) -> None:
    prompt = "One two three four"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, echo=True, logprobs=1, temperature=0)
    c = out.choices[0]
    plp = c.model_extra["prompt_logprobs"]
    n_prompt = out.usage.prompt_tokens
    assert len(plp) == n_prompt and c.text.startswith(prompt)
    lps = c.logprobs.token_logprobs
    assert len(lps) == n_prompt + 2 and lps[0] is None and c.logprobs.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lps[1:])
    for pos in range(1, n_prompt):
        own = next(v for v in plp[pos].values() if v["decoded_token"] == c.logprobs.tokens[pos])
        assert lps[pos] == pytest.approx(own["logprob"])
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, echo=True, logprobs=1,
                                              temperature=0, stream=True))
    first = streamed[0].choices[0].logprobs.token_logprobs
    assert first[0] is None and first[1:n_prompt] == pytest.approx(lps[1:n_prompt])


def test_prompt_logprobs_refused(client: openai.OpenAI) -> None:
    for value in (31, -1):  # over --max-logprobs 30 (-1: the whole vocabulary)
        with pytest.raises(openai.BadRequestError, match="max allowed: 30"):
            client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"prompt_logprobs": value})
    with pytest.raises(openai.BadRequestError, match="stream=True"):
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1, stream=True,
                                       extra_body={"prompt_logprobs": 1})
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={"prompt_logprobs": -2})


PARTIAL_EMOJI = 10813  # SmolLM2's byte-level token for the bytes F0 9F: the first half of a 4-byte emoji


def test_return_token_ids_on_every_choice(client: openai.OpenAI) -> None:
    """vLLM: each choice carries its own prompt's ids (several prompts, n > 1); streamed, each choice's first
    chunk does; with echo the ids carry the prompt and the text does not repeat it."""
    prompts = ["Hello there", "The sky is"]
    tokenize = str(client.base_url).replace("/v1/", "/tokenize")
    ids = [httpx.post(tokenize, json={"prompt": p}, timeout=120).json()["tokens"] for p in prompts]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2, temperature=1.0, seed=3,
                                    extra_body={"return_token_ids": True})
    assert [c.model_extra["prompt_token_ids"] for c in out.choices] == [ids[0], ids[0], ids[1], ids[1]]
    assert all(len(c.model_extra["token_ids"]) == 3 for c in out.choices)
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2, stream=True,
                                            extra_body={"return_token_ids": True}))
    firsts: dict[int, list[int]] = {}
    for c in chunks[:-1]:
        choice = c.choices[0]
        given = choice.model_extra.get("prompt_token_ids")
        assert (given is not None) == (choice.index not in firsts), choice
        firsts.setdefault(choice.index, given)
    assert firsts == {0: ids[0], 1: ids[0], 2: ids[1], 3: ids[1]}
    echoed = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=2, echo=True, temperature=0,
                                       extra_body={"return_token_ids": True}).choices[0]
    assert echoed.model_extra["prompt_token_ids"] == ids[0] and not echoed.text.startswith(prompts[0])


def test_stop_inside_a_character_holds_back_its_bytes(client: openai.OpenAI) -> None:
    """A completion cut after half of a multi-byte character ends before it (no U+FFFD), also streamed and with
    ``return_tokens_as_token_ids``; the token ids still hold the token."""
    kw = {"model": MODEL, "prompt": "Cat emoji:", "max_tokens": 1, "temperature": 0,
          "logit_bias": {str(PARTIAL_EMOJI): 100}}
    out = client.completions.create(**kw, logprobs=1, extra_body={"return_token_ids": True,
                                                                  "return_tokens_as_token_ids": True}).choices[0]
    assert out.model_extra["token_ids"] == [PARTIAL_EMOJI] and out.logprobs.tokens == [f"token_id:{PARTIAL_EMOJI}"]
    assert out.text == "" and out.finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == ""
    chat = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1, temperature=0,
                                          logit_bias={str(PARTIAL_EMOJI): 100})
    assert chat.choices[0].message.content == ""


def test_streamed_usage_as_vllm_fills_it(client: openai.OpenAI) -> None:
    """Each chunk: three counts (continuous usage, forced); the last: the cached prompt tokens as well
    (--enable-prompt-tokens-details), the second run of a long prompt finding it in the prefix cache."""
    prompt = "Count slowly from one to fifty, writing every number out in words, one per line. " * 3
    finals = []
    for _ in range(2):
        with httpx.stream("POST", str(client.base_url) + "completions",
                          json={"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": True}, timeout=120) as r:
            bodies = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert all(set(b["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"} for b in bodies[:-1])
        finals.append(bodies[-1]["usage"])
    assert set(finals[0]) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert finals[0]["completion_tokens"] == 3 and finals[0]["total_tokens"] == finals[0]["prompt_tokens"] + 3
    assert finals[1]["prompt_tokens_details"]["cached_tokens"] >= 16  # at least one full block


def test_batched_chat_completions(srv: Server) -> None:
    url = srv.url + "/v1/chat/completions/batch"
    convs = [[{"role": "user", "content": "Say alpha"}], [{"role": "user", "content": "Say beta"}]]
    body = httpx.post(url, json={"model": MODEL, "messages": convs, "max_tokens": 4, "temperature": 0,
                                 "logprobs": True, "top_logprobs": 1, "return_tokens_as_token_ids": True},
                      timeout=120).json()
    assert body["object"] == "chat.completion" and [c["index"] for c in body["choices"]] == [0, 1]
    singles = [httpx.post(srv.url + "/v1/chat/completions", json={"model": MODEL, "messages": conv, "max_tokens": 4,
                                                                   "temperature": 0}, timeout=120).json()
               for conv in convs]
    for choice, single in zip(body["choices"], singles):
        assert choice["message"]["content"] == single["choices"][0]["message"]["content"]
        assert all(e["token"].startswith("token_id:") for e in choice["logprobs"]["content"])
    assert body["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert body["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
    for extra, needle in (({"n": 2}, "do not support `n > 1`"), ({"stream": True}, "streaming"),
                          ({"messages": [[]]}, "at least one message")):
        r = httpx.post(url, json={"model": MODEL, "messages": convs, **extra}, timeout=120)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_invocations_keys_are_the_routes_keys(srv: Server) -> None:
    """SageMaker's ``/invocations`` answers exactly what the route it picks answers."""
    for path, body in (("/v1/chat/completions", {"messages": MSG}), ("/v1/completions", {"prompt": "Hi"})):
        args = {"model": MODEL, "max_tokens": 3, "temperature": 0, **body}
        direct = httpx.post(srv.url + path, json=args, timeout=120).json()
        via = httpx.post(srv.url + "/invocations", json=args, timeout=120).json()
        assert direct.keys() == via.keys() and direct["choices"] == via["choices"]


def test_truncation_side(client: openai.OpenAI) -> None:
    """``truncate_prompt_tokens`` keeps the prompt's end, or its start with ``truncation_side: right``."""
    for side, kept in (("right", [0, 1, 2, 3]), ("left", [4, 5, 6, 7]), (None, [4, 5, 6, 7])):
        out = client.completions.create(model=MODEL, prompt=list(range(8)), max_tokens=1, temperature=0,
                                        extra_body={"return_token_ids": True, "truncate_prompt_tokens": 4,
                                                    "truncation_side": side})
        assert out.choices[0].model_extra["prompt_token_ids"] == kept, side


def test_allowed_token_ids_and_logprob_token_ids(srv: Server, client: openai.OpenAI) -> None:
    """``allowed_token_ids`` restricts sampling; ``logprob_token_ids`` shows those ids (and the sampled one) in
    place of the top-k, on completions (both modes), chat and the batched chat route, as vLLM."""
    extra = {"logprob_token_ids": [5000], "allowed_token_ids": [42], "return_tokens_as_token_ids": True}
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, temperature=0, logprobs=5,
                                    extra_body=extra)
    assert out.choices[0].logprobs.tokens == ["token_id:42"]
    assert set(out.choices[0].logprobs.top_logprobs[0]) == {"token_id:42", "token_id:5000"}
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, temperature=0, logprobs=5,
                                            stream=True, extra_body=extra))
    tops = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.top_logprobs]
    assert len(tops) == 1 and set(tops[0]) == {"token_id:42", "token_id:5000"}
    chat = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1, temperature=0, logprobs=True,
                                          extra_body={**extra, "logprob_token_ids": [100, 1000, 5000],
                                                      "allowed_token_ids": [5000]})
    first = chat.choices[0].logprobs.content[0]
    assert first.token == "token_id:5000" and {e.token for e in first.top_logprobs} == \
        {"token_id:100", "token_id:1000", "token_id:5000"}
    assert all(-1e4 < e.logprob < 0 for e in first.top_logprobs)
    batch = httpx.post(srv.url + "/v1/chat/completions/batch", timeout=120, json={
        "model": MODEL, "messages": [MSG], "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5,
        "logprob_token_ids": [100, 1000], "return_tokens_as_token_ids": True}).json()
    entry = batch["choices"][0]["logprobs"]["content"][0]
    assert {e["token"] for e in entry["top_logprobs"]} == {"token_id:100", "token_id:1000", entry["token"]}
    for kwargs, needle in (({"logprobs": 1, "extra_body": {"allowed_token_ids": [10**6]}}, "out-of-vocab token id!"),
                           ({"extra_body": {"logprob_token_ids": [1]}}, "`logprobs` must be set."),
                           ({"extra_body": {"allowed_token_ids": []}}, "allowed_token_ids is not None and empty!")):
        with pytest.raises(openai.BadRequestError, match=re.escape(needle)):
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, **kwargs)


def test_per_request_metrics(client: openai.OpenAI) -> None:
    """``--enable-per-request-metrics``: vLLM's timing ``metrics`` on a response of one generation and on the
    final usage chunk of a stream (null figures left out there: one token has no inter-token latency)."""
    timing = {"time_to_first_token_ms", "generation_time_ms", "queue_time_ms", "mean_itl_ms", "tokens_per_second"}
    out = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, temperature=0,
                                         extra_body={"min_tokens": 4})
    metrics = out.model_extra["metrics"]
    assert timing <= metrics.keys() and all(metrics[k] >= 0 for k in timing) and metrics["tokens_per_second"] > 0
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=2).model_extra["metrics"] is None
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1, temperature=0,
                                                 stream=True, extra_body={"min_tokens": 1}))
    assert all("metrics" not in (c.model_extra or {}) for c in chunks[:-1]) and chunks[-1].choices == []
    assert set(chunks[-1].model_extra["metrics"]) == timing - {"mean_itl_ms"}


def test_kv_transfer_prompt_token_ids_are_used_verbatim(client: openai.OpenAI) -> None:
    """A decode stage's chat request with the prefill stage's ``kv_transfer_params.prompt_token_ids``: those ids
    are the prompt (the request's own messages are not rendered); malformed ids get vLLM's 400."""
    ids = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1, temperature=0,
                                         extra_body={"return_token_ids": True}).model_extra["prompt_token_ids"]
    other = [{"role": "user", "content": "unrelated decode-side text"}]
    out = client.chat.completions.create(model=MODEL, messages=other, max_tokens=2, temperature=0, extra_body={
        "kv_transfer_params": {"prompt_token_ids": ids}, "return_token_ids": True})
    assert out.model_extra["prompt_token_ids"] == ids and out.usage.prompt_tokens == len(ids)
    for bad, needle in (([], "must be a non-empty list of non-negative integers."), ([10**7], "out of vocabulary")):
        with pytest.raises(openai.BadRequestError, match=re.escape(needle)):
            client.chat.completions.create(model=MODEL, messages=other, max_tokens=1,
                                           extra_body={"kv_transfer_params": {"prompt_token_ids": bad}})


def test_logit_bias_as_vllm(client: openai.OpenAI) -> None:
    """Every non-integer key named in vLLM's text; out-of-vocabulary ids in vLLM's text; biases clamped to
    [-100, 100] (not refused), as vLLM."""
    with pytest.raises(openai.BadRequestError, match=re.escape("converted to integer token IDs: ['bad1', 'bad2']")):
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1, logit_bias={"bad1": 5, "bad2": 1})
    with pytest.raises(openai.BadRequestError, match=re.escape("token_id(s) [49153] in logit_bias contain "
                                                               "out-of-vocab token ids. Vocabulary size: 49152")):
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1, logit_bias={"49153": 1})
    out = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1, temperature=1.0,
                                         logit_bias={"42": 500}, extra_body={"return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == [42]
