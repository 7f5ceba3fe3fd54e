"""The serving API against a real 3-rank job on the tiny model: the official `openai` client, streaming,
errors, continuous batching, admission (503), the API key, CORS and /metrics.

Two servers for the whole module (each mpirun start costs seconds): `server` with the defaults, and
`strict` with an API key, a CORS origin and room for one sequence plus one waiting request.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import hf_greedy, serving

KEY = "test-key-0123"
ORIGIN = "http://chat.example.test"
CONTEXT = 128       # the tiny model's n_positions
SIMPLE_CHAT_STOP = "\nUser:"
# One client for the module: a bare httpx.post() builds a TLS context per call (~0.1 s), which would
# swamp the timings of the batching tests. httpx.Client is thread-safe.
web = httpx.Client(timeout=60)


@pytest.fixture(scope="module")
def server(parts3, tmp_path_factory):
    with serving(parts3, 3, tmp_path_factory.mktemp("log")) as s:
        yield s


@pytest.fixture(scope="module")
def strict(parts3, tmp_path_factory):
    with serving(parts3, 3, tmp_path_factory.mktemp("strict"), "--api-key", KEY, "--cors-origin", ORIGIN,
                 "--slots", "1", "--queue-size", "1") as s:
        yield s


@pytest.fixture(scope="module")
def model_id(server):
    return web.get(server.url + "/health").json()["model"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def post(url: str, body, **kw) -> httpx.Response:
    return web.post(url, json=body, timeout=60, **kw)


def complete(server, **body) -> dict:
    r = post(server.url + "/v1/completions", {"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(lines):
    """Yields the data of each server-sent event as it comes, checking every non-blank line is `data: `."""
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        yield line[len("data: "):]


def assert_openai_error(r: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert "param" in err and "code" in err, err
    return err


def metric_samples(url: str, headers: dict | None = None) -> dict[tuple, float]:
    """{(sample name, frozenset of labels): value} from /metrics."""
    r = web.get(url + "/metrics", headers=headers or {}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def metric(samples: dict, name: str, **labels) -> float:
    """The sum of the samples called name whose labels include `labels`."""
    want = set((k, str(v)) for k, v in labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


# ---------------------------------------------------------------- the official client


def test_models_lists_the_served_model(client, server, model_id):
    models = client.models.list().data
    assert [m.id for m in models] == [model_id]
    assert models[0].object == "model" and models[0].owned_by
    raw = web.get(server.url + "/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["id"] == model_id


@pytest.mark.parametrize("prompt, n", [("Once upon a time", 24), ("the cat", 40)])
def test_completion_greedy_equals_transformers(client, model_id, tiny_model_dir, tok, prompt, n):
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=n, temperature=0)
    assert r.object == "text_completion" and r.model == model_id and r.id
    assert r.choices[0].text == hf_greedy(tiny_model_dir, prompt, n)
    assert r.choices[0].finish_reason == "length" and r.choices[0].index == 0
    p = len(tok(prompt)["input_ids"])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (p, n, p + n)


def test_streamed_completion_concatenates_to_the_same_text(client, model_id):
    args = dict(model=model_id, prompt="the cat sat on", max_tokens=40, temperature=0)
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 3, "the text should arrive in pieces"
    assert "".join(c.choices[0].text for c in text_chunks) == whole
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert len({c.id for c in chunks}) == 1


def test_chat_uses_the_simple_template_and_streams_the_same_text(client, model_id, tiny_model_dir):
    question = "What is a pipeline?"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=30, temperature=0)
    # The documented template for models without one: "Role: content\n" per message, then "Assistant:".
    expected = hf_greedy(tiny_model_dir, f"System: Be brief.\nUser: {question}\nAssistant:", 30)
    cut = expected.find(SIMPLE_CHAT_STOP)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == (expected if cut == -1 else expected[:cut])
    assert r.choices[0].finish_reason == ("length" if cut == -1 else "stop")
    assert r.object == "chat.completion" and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=model_id, messages=msgs, max_tokens=30, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_without_max_tokens_fits_the_context(client, model_id):
    # OpenAI's default is "up to the context"; the server caps its default to the room the prompt leaves.
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.total_tokens <= CONTEXT
    if r.choices[0].finish_reason == "length":       # it ran to the end of the context, not to a smaller default
        assert r.usage.total_tokens == CONTEXT, r.usage


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("as_list", [False, True])
def test_stop_strings(client, server, model_id, stream, as_list):
    prompt = "Once upon a time"
    full = complete(server, prompt=prompt, max_tokens=40)["choices"][0]["text"]
    # A stop string from the middle of the greedy text, free of replacement characters.
    stop = next(full[i:i + 2] for i in range(6, len(full) - 2) if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())
    want = full[:full.index(stop)]
    args = dict(model=model_id, prompt=prompt, max_tokens=40, temperature=0,
                stop=["never-in-this-text", stop] if as_list else stop)
    if stream:
        chunks = list(client.completions.create(**args, stream=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**args)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.completion_tokens < 40
    assert (text, finish) == (want, "stop")


@pytest.mark.parametrize("n", [1, 5, 17])
def test_max_tokens_is_exact_and_finishes_with_length(client, model_id, n):
    r = client.completions.create(model=model_id, prompt="a b c", max_tokens=n, temperature=0)
    assert r.usage.completion_tokens == n and r.choices[0].finish_reason == "length"


def test_seed_makes_sampling_repeatable(client, model_id):
    def run(seed):
        return client.completions.create(model=model_id, prompt="the cat", max_tokens=24, temperature=1.5,
                                         top_p=0.95, seed=seed).choices[0].text
    assert run(11) == run(11)
    assert len({run(s) for s in (1, 2, 3, 4)}) > 1, "different seeds should give different samples"


def test_top_p_zero_keeps_only_the_likeliest_token(client, model_id):
    # OpenAI's schema admits top_p 0; it leaves one candidate, so any temperature decodes greedily
    greedy = client.completions.create(model=model_id, prompt="the cat", max_tokens=24, temperature=0)
    for seed in (1, 2):
        r = client.completions.create(model=model_id, prompt="the cat", max_tokens=24, temperature=2.0, top_p=0,
                                      seed=seed)
        assert r.choices[0].text == greedy.choices[0].text


def test_raw_sse_ends_with_done(server):
    # greedy: sampled, the tiny model drew its end-of-text token within the 8 tokens now and then
    for path, body, kind in [
        ("/v1/completions", {"prompt": "a b", "max_tokens": 8, "stream": True, "temperature": 0}, "text_completion"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True,
                                  "temperature": 0, "stream_options": {"include_usage": True}}, "chat.completion.chunk"),
    ]:
        with web.stream("POST", server.url + path, json=body, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            raw = r.read().decode()
        assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
        events = list(sse_events(raw.split("\n")))
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == kind for c in chunks)
        finished = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finished[-1] == "length" and finished.count("length") == 1
    # include_usage: a last chunk with no choices has the counts; every other chunk has "usage": null
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])


def test_n_above_one_is_rejected_with_an_openai_error(client, server, model_id):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model_id, prompt="hi", n=2, max_tokens=4)
    assert err.value.status_code == 400 and err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], n=2)
    assert_openai_error(post(server.url + "/v1/completions", {"prompt": "hi", "n": 2}), 400)


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=4)
    assert err.value.status_code == 404 and "gpt-17" in err.value.body["message"]
    err = assert_openai_error(post(server.url + "/v1/chat/completions",
                                   {"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}), 404)
    assert err["param"] == "model"


def test_null_fields_mean_their_defaults(server):
    # OpenAI's schema makes temperature, top_p, stop, seed, max_tokens, stream... nullable; some clients send null.
    body = {"prompt": "a b", "max_tokens": 4, "temperature": None, "top_p": None, "stop": None, "seed": None,
            "stream": None, "n": None, "model": None}
    r = post(server.url + "/v1/completions", body)
    assert r.status_code == 200, r.text
    # null temperature is the default 1.0: sampled, the tiny model draws its end-of-text token now and then
    done = (r.json()["choices"][0]["finish_reason"], r.json()["usage"]["completion_tokens"])
    assert done == ("length", 4) or (done[0] == "stop" and done[1] < 4), done


@pytest.mark.parametrize("extra", [
    {"temperature": 1e-30}, {"temperature": 1e-30, "top_p": 0.5, "top_k": 3}, {"temperature": 2.0},
    {"top_p": 1e-9}, {"top_k": 1}, {"top_k": 10**9}, {"seed": 2**63 - 1}, {"seed": 0},
    {"stop": ["\n", " ", "a", "e"]}, {"echo": True}, {"user": "someone", "unknown_field": [1, 2]},
], ids=lambda e: ",".join(e))
def test_odd_but_valid_values_are_served(server, extra):
    r = post(server.url + CMPL, {"prompt": "a b", "max_tokens": 6, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


# ---------------------------------------------------------------- bad requests: always a 4xx, never a 500

HELLO_200 = "hello " * 200      # ~1000 tokens: over the 128-token context
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

BAD = [
    # (id, path, json body or raw bytes, expected status or None for any 4xx)
    ("prompt-int", CMPL, {"prompt": 123}, 400),
    ("prompt-token-id-outside-vocab", CMPL, {"prompt": [1, 2, 600]}, 400),
    ("prompt-mixed-list", CMPL, {"prompt": ["a", 1]}, 400),
    ("prompt-empty-token-list", CMPL, {"prompt": [[]]}, 400),
    ("prompt-empty-list", CMPL, {"prompt": []}, 400),
    ("prompt-empty", CMPL, {"prompt": ""}, 400),
    ("prompt-missing", CMPL, {"max_tokens": 4}, 400),
    ("prompt-over-context", CMPL, {"prompt": HELLO_200, "max_tokens": 4}, 400),
    ("prompt-plus-max-tokens-over-context", CMPL, {"prompt": "hi", "max_tokens": 200}, 400),
    ("prompt-over-char-limit", CMPL, {"prompt": "x" * 100_001}, 400),
    ("max-tokens-string", CMPL, {"prompt": "hi", "max_tokens": "ten"}, 400),
    ("max-tokens-negative", CMPL, {"prompt": "hi", "max_tokens": -1}, 400),
    ("max-tokens-zero", CMPL, {"prompt": "hi", "max_tokens": 0}, 400),
    ("max-tokens-float", CMPL, {"prompt": "hi", "max_tokens": 2.5}, 400),
    ("max-tokens-huge", CMPL, {"prompt": "hi", "max_tokens": 10**30}, 400),
    ("temperature-string", CMPL, {"prompt": "hi", "temperature": "hot"}, 400),
    ("temperature-negative", CMPL, {"prompt": "hi", "temperature": -0.5}, 400),
    ("temperature-too-high", CMPL, {"prompt": "hi", "temperature": 3}, 400),
    ("top-p-negative", CMPL, {"prompt": "hi", "top_p": -0.1}, 400),
    ("top-p-above-one", CMPL, {"prompt": "hi", "top_p": 1.5}, 400),
    ("top-k-negative", CMPL, {"prompt": "hi", "top_k": -1}, 400),
    ("seed-negative", CMPL, {"prompt": "hi", "seed": -1}, 400),
    ("seed-string", CMPL, {"prompt": "hi", "seed": "abc"}, 400),
    # JSON's false and "3" are not numbers (pydantic's lax mode took them as 0 and 3; the fuzzer found seed)
    ("seed-false", CHAT, {"messages": [{"role": "user", "content": ""}], "seed": False}, 400),
    ("max-tokens-true", CMPL, {"prompt": "hi", "max_tokens": True}, 400),
    ("n-true", CMPL, {"prompt": "hi", "n": True}, 400),
    ("temperature-false", CMPL, {"prompt": "hi", "temperature": False}, 400),
    ("top-k-numeric-string", CMPL, {"prompt": "hi", "top_k": "3"}, 400),
    ("max-tokens-numeric-string", CMPL, {"prompt": "hi", "max_tokens": "4"}, 400),
    ("stop-five", CMPL, {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("stop-empty-in-list", CMPL, {"prompt": "hi", "stop": [""]}, 400),
    ("stop-int", CMPL, {"prompt": "hi", "stop": 5}, 400),
    ("stream-not-bool", CMPL, {"prompt": "hi", "stream": "maybe"}, 400),
    ("stream-bad-max-tokens", CMPL, {"prompt": "hi", "stream": True, "max_tokens": -3}, 400),
    ("stream-over-context", CMPL, {"prompt": HELLO_200, "stream": True}, 400),
    ("n-zero", CMPL, {"prompt": "hi", "n": 0}, 400),
    ("model-int", CMPL, {"prompt": "hi", "model": 5}, 400),
    ("messages-empty", CHAT, {"messages": []}, 400),
    ("messages-missing", CHAT, {"max_tokens": 4}, 400),
    ("messages-string", CHAT, {"messages": "hi"}, 400),
    ("messages-too-many", CHAT, {"messages": USER * 257}, 400),
    ("role-bad", CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("role-missing", CHAT, {"messages": [{"content": "hi"}]}, 400),
    ("content-missing", CHAT, {"messages": [{"role": "user"}]}, 400),
    ("content-int", CHAT, {"messages": [{"role": "user", "content": 42}]}, 400),
    ("logit-bias", CMPL, {"prompt": "hi", "logit_bias": {"5": 10}}, 400),
    ("frequency-penalty", CHAT, {"messages": USER, "frequency_penalty": 0.5}, 400),
    ("presence-penalty", CMPL, {"prompt": "hi", "presence_penalty": -1}, 400),
    ("response-format-json", CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, 400),
    ("best-of", CMPL, {"prompt": "hi", "best_of": 3}, 400),
    ("suffix", CMPL, {"prompt": "hi", "suffix": "end"}, 400),
    ("tools", CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ("tool-choice-required", CHAT, {"messages": USER, "tool_choice": "required"}, 400),
    ("functions", CHAT, {"messages": USER, "functions": [{"name": "f", "parameters": {}}]}, 400),
    ("function-call-named", CHAT, {"messages": USER, "function_call": {"name": "f"}}, 400),
    ("logprobs-true", CMPL, {"prompt": "hi", "logprobs": True}, 400),
    ("logprobs-string", CMPL, {"prompt": "hi", "logprobs": "3"}, 400),
    ("prompt-bool-ids", CMPL, {"prompt": [True, False]}, 400),
    ("content-image-part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]}, 400),
    ("chat-over-context", CHAT, {"messages": [{"role": "user", "content": HELLO_200}], "max_tokens": 4}, 400),
    ("chat-max-tokens-negative", CHAT, {"messages": USER, "max_tokens": -1}, 400),
    ("chat-max-completion-tokens-zero", CHAT, {"messages": USER, "max_completion_tokens": 0}, 400),
    ("chat-stream-bad-role", CHAT, {"messages": [{"role": "x", "content": "hi"}], "stream": True}, 400),
    ("invalid-json", CMPL, b'{"prompt": "hi", ', 400),
    ("invalid-json-chat", CHAT, b'{"messages": [}', 400),
    ("not-utf8", CMPL, b'\xff\xfe{"prompt"', 400),
    ("body-array", CMPL, b"[1, 2]", 400),
    ("body-null", CMPL, b"null", 400),
    ("body-empty", CHAT, b"", 400),
    ("huge-body", CMPL, json.dumps({"prompt": "a" * (2 << 20)}).encode(), 413),
]


def test_unsupported_parameters_at_their_defaults_are_accepted(server):
    """What clients send unasked (LangChain sends both penalties as 0): no 400 for a no-op."""
    for path, body in ((CHAT, {"messages": USER}), (CMPL, {"prompt": "hi"})):
        r = post(server.url + path, {**body, "max_tokens": 2, "frequency_penalty": 0, "presence_penalty": 0.0,
                                     "logit_bias": {}, "best_of": 1, "response_format": {"type": "text"},
                                     "tools": [], "tool_choice": "auto", "functions": [], "function_call": "none"})
        assert r.status_code == 200, r.text
    r = post(server.url + CMPL, {"prompt": "hi", "logit_bias": {"5": 10}})
    assert "logit_bias" in r.json()["error"]["message"] and "not supported" in r.json()["error"]["message"]


def test_chat_content_as_text_parts_reads_as_the_joined_string(server):
    """LangChain and Open WebUI send OpenAI's content parts; text parts join with newlines."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "the cat"}, {"type": "text", "text": "sat"}]}]
    joined = [{"role": "user", "content": "the cat\nsat"}]
    got = [post(server.url + CHAT, {"messages": m, "max_tokens": 6, "temperature": 0}) for m in (parts, joined)]
    assert all(r.status_code == 200 for r in got), [r.text for r in got]
    assert got[0].json()["choices"][0]["message"] == got[1].json()["choices"][0]["message"]
    assert got[0].json()["usage"] == got[1].json()["usage"]
    r = post(server.url + CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert r.status_code == 400 and "only text parts" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path, body, param", [
    (CMPL, {"prompt": HELLO_200}, "prompt"),
    (CMPL, {"prompt": "hi", "max_tokens": 200}, "prompt"),
    (CHAT, {"messages": [{"role": "user", "content": HELLO_200}]}, "messages"),
])
def test_over_the_context_is_context_length_exceeded_naming_the_field(server, path, body, param):
    r = post(server.url + path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("context_length_exceeded", param), err
    assert "context of 128 tokens" in err["message"]
    if "max_tokens" not in body:        # the prompt alone is too long: nothing about max tokens it never set
        assert "max new tokens" not in err["message"] and "shorten it" in err["message"]


@pytest.mark.parametrize("path, body, status", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_is_a_4xx_with_an_openai_error(server, path, body, status):
    if isinstance(body, bytes):
        r = web.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = post(server.url + path, body)
    assert_openai_error(r, status)


def test_huge_chunked_body_is_refused_without_reading_it_all(server):
    # No Content-Length: the limit is on the bytes read, not on the header.
    def chunks():
        for _ in range(64):
            yield b"x" * (64 << 10)          # 4 MiB in all
    try:
        r = web.post(server.url + CMPL, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    except httpx.TransportError:
        pytest.fail("the server dropped the connection instead of answering 413")
    assert_openai_error(r, 413)


@pytest.mark.parametrize("method, path", [("GET", CMPL), ("PUT", CHAT), ("GET", "/nowhere"), ("POST", "/v1/models")])
def test_wrong_method_or_path_is_a_4xx_with_an_openai_error(server, method, path):
    assert_openai_error(web.request(method, server.url + path, timeout=10))


def test_still_healthy_after_the_bad_requests(server):
    h = web.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["active_sequences"] == 0 and h["queue_depth"] == 0
    assert complete(server, prompt="a", max_tokens=3)["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------- continuous batching


def test_greedy_text_is_the_same_alone_and_among_15_others(server):
    requests = [{"prompt": f"{w} was the start", "max_tokens": 24 + 3 * i, "temperature": 0}
                for i, w in enumerate(["Once", "the cat", "x y z", "a", "hello there", "zebra", "q", "numbers"])]
    requests += [{"prompt": f"sample {i}", "max_tokens": 30 + 4 * i, "temperature": 1.0, "top_k": 40, "seed": i}
                 for i in range(8)]
    assert len(requests) == 16
    alone = [complete(server, **r)["choices"][0]["text"] for r in requests]
    before = metric_samples(server.url)

    start = threading.Barrier(len(requests))

    def one(body):
        start.wait()
        return complete(server, **body)["choices"][0]["text"]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(one, requests))

    for body, a, t in zip(requests, alone, together):
        assert t == a, f"{body} changed when batched with others"
    after = metric_samples(server.url)
    # They really shared micro-batches: some micro-batch carried more than one sequence.
    multi = lambda s: (metric(s, "shardline_microbatch_sequences_count")
                       - metric(s, "shardline_microbatch_sequences_bucket", le="1.0"))
    assert multi(after) - multi(before) > 0


def test_a_new_request_finishes_while_a_long_one_runs(server):
    long_body = {"prompt": "a", "max_tokens": CONTEXT - 8, "temperature": 0, "stream": True}
    alone = complete(server, **{**long_body, "stream": False})["choices"][0]["text"]

    def one_try() -> tuple[float, float]:
        first_token, events = threading.Event(), {}

        def read_long():
            parts = []
            with web.stream("POST", server.url + CMPL, json=long_body) as r:
                for data in sse_events(r.iter_lines()):
                    if data == "[DONE]":
                        events["long_done"] = time.monotonic()
                        break
                    parts.append(json.loads(data)["choices"][0]["text"])
                    first_token.set()
            events["long_text"] = "".join(parts)
        reader = threading.Thread(target=read_long)
        reader.start()
        assert first_token.wait(30)
        t0 = time.monotonic()
        short = complete(server, prompt="b c", max_tokens=3)
        short_done = time.monotonic()
        reader.join(60)
        assert short["usage"]["completion_tokens"] == 3
        assert events["long_text"] == alone
        return short_done - t0, events["long_done"] - t0

    # The long answer takes ~0.3 s here; a descheduled test thread on a busy machine can miss that
    # window, so a few tries: the short request must overtake the long one at least once.
    tries = []
    for _ in range(3):
        tries.append(one_try())
        if tries[-1][0] < tries[-1][1]:
            break
    assert any(short < long for short, long in tries), (
        f"the short request never finished before the long one (seconds after the long one's first token, "
        f"short vs long): {tries}")


def hang_ups_free_the_slot(server, body: dict, hang_up) -> None:
    """hang_up(body) sends a request and leaves with most of the answer still to come: its slot comes
    back, and in one of a few tries the answer is cut short (the tiny model writes it all in ~0.3 s, so
    on a busy machine a client may not get to hang up before it is done)."""
    generated = lambda: metric(metric_samples(server.url), "shardline_generated_tokens_total")
    cut_short = []
    for _ in range(5):
        g0 = generated()
        hang_up(body)
        deadline = time.monotonic() + 10
        while web.get(server.url + "/health").json()["active_sequences"] != 0:
            assert time.monotonic() < deadline, "the abandoned request kept its slot"
            time.sleep(0.05)
        cut_short.append(generated() - g0)
        if cut_short[-1] < body["max_tokens"]:
            break
    assert min(cut_short) < body["max_tokens"], f"the server generated every answer for nobody: {cut_short}"
    assert metric(metric_samples(server.url), "shardline_active_sequences") == 0
    assert complete(server, prompt="a", max_tokens=4)["usage"]["completion_tokens"] == 4


def test_a_client_that_hangs_up_on_a_non_streamed_request_frees_its_slot(server):
    """The answer is not generated for nobody: the server looks for the client while text is coming."""
    def hang_up(body):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + CMPL, json=body, timeout=0.05)
    hang_ups_free_the_slot(server, {"prompt": "a", "max_tokens": CONTEXT - 8, "temperature": 0}, hang_up)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    def hang_up(body):
        with httpx.Client(timeout=30) as h, h.stream("POST", server.url + CMPL, json=body) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got == 2:
                    break
            r.close()
    hang_ups_free_the_slot(server, {"prompt": "a", "max_tokens": CONTEXT - 8, "temperature": 0, "stream": True},
                           hang_up)


# ---------------------------------------------------------------- metrics


def test_metrics_cover_requests_tokens_latency_queue_and_every_rank(server):
    # the server is shared with the other tests: the counters must move by what these two requests did
    for _ in range(100):                 # nothing left running from an earlier test
        health = web.get(server.url + "/health").json()
        if health["active_sequences"] == 0 and health["queue_depth"] == 0:
            break
        time.sleep(0.2)
    before = metric_samples(server.url)
    complete(server, prompt="metrics please", max_tokens=8)
    assert post(server.url + CMPL, {"prompt": "hi", "max_tokens": -1}).status_code == 400
    deadline = time.monotonic() + 8     # the per-rank gauges refresh every 2 s
    while True:
        s = metric_samples(server.url)
        ranks = [(metric(s, "shardline_rank_compute_seconds", rank=r), metric(s, "shardline_rank_bytes_sent", rank=r),
                  metric(s, "shardline_rank_bytes_received", rank=r)) for r in range(3)]
        if all(min(v) > 0 for v in ranks) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert all(min(v) > 0 for v in ranks), f"per-rank compute/bytes not all positive: {ranks}"
    def grew(name, **labels):
        return metric(s, name, **labels) - metric(before, name, **labels)
    assert grew("shardline_requests_total", endpoint=CMPL, status=200) == 1
    assert grew("shardline_requests_total", endpoint=CMPL, status=400) == 1
    assert grew("shardline_generated_tokens_total") == 8
    assert grew("shardline_time_to_first_token_seconds_count") == 1
    assert grew("shardline_time_to_first_token_seconds_bucket", le="+Inf") == 1
    assert grew("shardline_time_per_output_token_seconds_count") == 7
    assert ("shardline_queue_depth", frozenset()) in s and ("shardline_active_sequences", frozenset()) in s
    # A decode step sends one hidden vector per hop: every rank both sends and receives.
    assert all(sent > 0 and recv > 0 for _, sent, recv in ranks)


# ---------------------------------------------------------------- admission: a full queue is a 503


def test_a_full_queue_answers_503_with_retry_after(strict):
    auth = {"Authorization": f"Bearer {KEY}"}
    flood = 10

    def one(i):
        return web.post(strict.url + CMPL, json={"prompt": f"flood {i}", "max_tokens": 100, "temperature": 0},
                        headers=auth, timeout=60)
    with ThreadPoolExecutor(flood + 1) as pool:
        # The one slot is taken first, so the flood finds it busy and the queue (of one) empty: the
        # queue takes one of them, the rest are refused. (Without waiting, which thread runs first
        # decides whether the first request still sits in the queue when the flood arrives.)
        first = pool.submit(one, -1)
        deadline = time.monotonic() + 30
        while web.get(strict.url + "/health").json()["active_sequences"] < 1 and not first.done():
            assert time.monotonic() < deadline, "the first request never started"
            time.sleep(0.01)
        start = threading.Barrier(flood)

        def flooded(i):
            start.wait()
            return one(i)
        replies = [first.result(), *pool.map(flooded, range(flood))]
    codes = sorted(r.status_code for r in replies)
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 2, codes          # the one in the slot and the one in the queue
    busy = [r for r in replies if r.status_code == 503]
    assert busy, f"one slot and a queue of one should have refused some of {flood}: {codes}"
    for r in busy:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "server_busy" and r.json()["error"]["message"]
    h = web.get(strict.url + "/health").json()
    assert h["queue_depth"] == 0 and h["active_sequences"] == 0


# ---------------------------------------------------------------- API key


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/models", None),
    ("POST", CMPL, {"prompt": "hi", "max_tokens": 2}),
    ("POST", CHAT, {"messages": USER, "max_tokens": 2}),
    ("POST", CHAT, {"messages": USER, "max_tokens": 2, "stream": True}),
    ("POST", "/generate", {"prompt": "hi", "max_new_tokens": 2}),
    ("GET", "/metrics", None),
    ("GET", "/docs", None),
])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer", f"bearer {KEY}x"])
def test_api_key_is_required_everywhere_but_health(strict, method, path, body, auth):
    headers = {"Authorization": auth} if auth else {}
    r = web.request(method, strict.url + path, json=body, headers=headers, timeout=30)
    err = assert_openai_error(r, 401)
    assert err["type"] == "authentication_error"


def test_api_key_lets_the_right_key_in(strict):
    assert web.get(strict.url + "/health").status_code == 200            # open: for load balancers
    assert web.get(strict.url + "/").status_code == 200                  # the chat page asks for the key itself
    ok = openai.OpenAI(base_url=strict.url + "/v1", api_key=KEY, max_retries=0)
    model = ok.models.list().data[0].id
    r = ok.completions.create(model=model, prompt="a b", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5
    chunks = list(ok.chat.completions.create(model=model, messages=USER, max_tokens=5, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert web.get(strict.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    wrong = openai.OpenAI(base_url=strict.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


# ---------------------------------------------------------------- CORS


def test_cors_is_off_by_default(server):
    r = web.get(server.url + "/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = web.options(server.url + CHAT, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_cors_origin_allows_that_origin_only(strict):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    pre = web.options(strict.url + CHAT, headers=preflight)      # a preflight never carries the key
    assert pre.status_code == 200, pre.text
    assert pre.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    auth = {"Authorization": f"Bearer {KEY}"}
    r = web.post(strict.url + CHAT, json={"messages": USER, "max_tokens": 2}, headers={"Origin": ORIGIN, **auth})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    # An error reply carries the header too, so a page on that origin can read why.
    r = web.get(strict.url + "/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    other = web.get(strict.url + "/v1/models", headers={"Origin": "http://evil.test", **auth})
    assert "access-control-allow-origin" not in other.headers
    bad_pre = web.options(strict.url + CHAT, headers={**preflight, "Origin": "http://evil.test"})
    assert bad_pre.headers.get("access-control-allow-origin") != "http://evil.test"
