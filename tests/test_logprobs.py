"""Log probabilities through the API (`logprobs`, `echo`), against transformers' log-softmax on the same
weights: the prompt's own tokens (what lm-evaluation-harness's `local-completions` scores), the
generated tokens with their top-k, chat's `logprobs`/`top_logprobs`, and the refusals. One server with
one rank and one with three (the last stage returns every prompt row), fp32: within 1e-4.
"""
from __future__ import annotations

import httpx
import pytest
import torch

from tests.helpers import hf_greedy_ids, hf_model, serving

TOL = 1e-4
PROMPT = "the cat sat on the mat and then it ran far away from the big dog in the park"
web = httpx.Client(timeout=60)


@pytest.fixture(scope="module", params=[1, 3], ids=["1rank", "3ranks"])
def server(request, tiny_model_dir, parts3, tmp_path_factory):
    from tests.helpers import split
    parts = parts3 if request.param == 3 else split(tiny_model_dir, 1, tmp_path_factory.mktemp("parts1"))
    # Prompts of over 40 tokens are prefilled in chunks, each of which brings back its rows.
    with serving(parts, request.param, tmp_path_factory.mktemp("log"), "--max-batch-tokens", "40") as s:
        yield s


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    """(tokenizer, ids -> [len, vocab] log-softmax of transformers' logits)."""
    from transformers import AutoTokenizer
    model = hf_model(tiny_model_dir)

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return AutoTokenizer.from_pretrained(tiny_model_dir), logprobs


def post(server, path: str, body: dict) -> httpx.Response:
    return web.post(server.url + path, json=body)


def completion(server, **body) -> dict:
    r = post(server, "/v1/completions", {"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def texts_after(tok, context: list[int], ids: list[int]) -> list[str]:
    """The text each of ids adds after context, by the API's rule (shardline.detok.added_text: the
    context less an unfinished character at its end, so a byte that continues it shows the character)."""
    from shardline.detok import added_text
    return [added_text(tok, [i], context, skip_special_tokens=False) for i in ids]


def check_top(top: dict, row: torch.Tensor, k: int, chosen: str, chosen_lp: float, tok, context: list[int],
              chosen_id: int) -> None:
    """A top_logprobs dict holds exactly the k likeliest tokens, each under the text it would add after
    context (two tokens that would add the same text share a key, with the likelier one's value), and
    the chosen token (chosen_id) under its spelling in `tokens`, so a client can look it up there (a
    byte of an unfinished character adds "" there, where alone it would show U+FFFD). A token within
    TOL of the k-th likeliest may stand in for it (the two sides round differently)."""

    def names(ids):
        return [chosen if i == chosen_id else t for i, t in zip(ids, texts_after(tok, context, ids))]
    order = row.argsort(descending=True)
    kth = row[order[k - 1]].item()
    required = [i for i in order[:k].tolist() if row[i].item() > kth + TOL]
    allowed = [i for i in order[:k + 8].tolist() if row[i].item() >= kth - TOL]
    best = {}                                    # text -> the likeliest value among the allowed ids
    for i, name in zip(allowed, names(allowed)):
        best.setdefault(name, row[i].item())
    must = set(names(required)) | {chosen}
    assert must <= set(top) <= set(best) | {chosen}, (sorted(top), sorted(must), sorted(best))
    assert len(top) >= min(k, len(best)), (top, best)
    for name, v in top.items():
        want = chosen_lp if name == chosen and name not in best else best[name]
        assert abs(v - want) <= TOL, (name, v, want)
    assert abs(max(top.values()) - row[order[0]].item()) <= TOL, (top, row[order[0]])
    assert abs(top[chosen] - max(chosen_lp, best.get(chosen, chosen_lp))) <= TOL, (chosen, top, chosen_lp)


@pytest.mark.parametrize("k", [0, 1, 5])
def test_echo_scores_the_prompt_like_transformers(server, ref, k):
    tok, logprobs = ref
    ids = tok(PROMPT)["input_ids"]
    body = completion(server, prompt=PROMPT, max_tokens=0, echo=True, logprobs=k)
    choice = body["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.decode([i]) for i in ids]
    assert "".join(lp["tokens"]) == PROMPT
    assert lp["text_offset"] == [len("".join(lp["tokens"][:j])) for j in range(len(ids))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = logprobs(ids)
    got = torch.tensor(lp["token_logprobs"][1:])
    expected = want[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert (got - expected).abs().max().item() <= TOL, (got - expected).abs().max()
    for j in range(1, len(ids)):
        top = lp["top_logprobs"][j]
        if k == 0:
            assert top == {lp["tokens"][j]: lp["token_logprobs"][j]}
        else:
            check_top(top, want[j - 1], k, lp["tokens"][j], lp["token_logprobs"][j], tok, ids[:j], ids[j])


def test_a_prompt_of_the_whole_context_is_scored_in_chunks(server, ref):
    """128 tokens (the context), prefilled 40 at a time: every position is scored once, and the
    request fits since it generates nothing."""
    tok, logprobs = ref
    ids = tok(" ".join(["the cat sat on the mat"] * 20))["input_ids"][:128]
    lp = completion(server, prompt=ids, max_tokens=0, echo=True, logprobs=1)["choices"][0]["logprobs"]
    expected = logprobs(ids)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert len(lp["token_logprobs"]) == len(ids)
    assert (torch.tensor(lp["token_logprobs"][1:]) - expected).abs().max().item() <= TOL


def test_lm_evaluation_harness_loglikelihood_request(server, ref):
    """What lm-eval's local-completions sends for loglikelihood (token ids, batched, max_tokens 1, echo,
    logprobs 1, temperature 0) and how its parse_logprobs reads the answer: the continuation's summed
    log probability token_logprobs[ctxlen:-1] and whether it is the greedy continuation."""
    tok, logprobs = ref
    pairs = [("the cat sat on the", " mat"), ("once upon a", " time there was"), ("a b c", " d e f")]
    prompts = [tok(c)["input_ids"] + tok(x)["input_ids"] for c, x in pairs]
    body = completion(server, model=None, prompt=prompts, max_tokens=1, logprobs=1, echo=True, seed=1234)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for (ctx, cont), ids, choice in zip(pairs, prompts, body["choices"]):
        ctxlen = len(tok(ctx)["input_ids"])
        token_logprobs = choice["logprobs"]["token_logprobs"]
        tops = choice["logprobs"]["top_logprobs"]
        assert len(token_logprobs) == len(ids) + 1          # the prompt, then the one generated token
        got = sum(token_logprobs[ctxlen:-1])
        want = logprobs(ids)
        cont_ids = ids[ctxlen:]
        expected = sum(want[ctxlen - 1 + j, t].item() for j, t in enumerate(cont_ids))
        assert abs(got - expected) <= TOL * len(cont_ids)
        is_greedy = all(t == max(top.values()) for t, top in zip(token_logprobs[ctxlen:-1], tops[ctxlen:-1]))
        hf_greedy = all(want[ctxlen - 1 + j].argmax().item() == t for j, t in enumerate(cont_ids))
        assert is_greedy == hf_greedy


def test_generated_tokens_carry_their_logprobs(server, ref, tiny_model_dir):
    tok, logprobs = ref
    prompt = "once upon a time"
    choice = completion(server, prompt=prompt, max_tokens=12, logprobs=3)["choices"][0]
    lp = choice["logprobs"]
    ids = tok(prompt)["input_ids"]
    gen = hf_greedy_ids(tiny_model_dir, ids, 12)
    # Each token's share of the text: they join to it exactly, even where a token ends inside a character.
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == len(gen)
    assert lp["text_offset"] == [len("".join(lp["tokens"][:j])) for j in range(len(gen))]
    want = logprobs(ids + gen)[len(ids) - 1:-1]
    expected = want[torch.arange(len(gen)), torch.tensor(gen)]
    assert (torch.tensor(lp["token_logprobs"]) - expected).abs().max().item() <= TOL
    for j, top in enumerate(lp["top_logprobs"]):
        check_top(top, want[j], 3, lp["tokens"][j], lp["token_logprobs"][j], tok, ids + gen[:j], gen[j])
        assert max(top.values()) == lp["token_logprobs"][j]        # greedy: the chosen is the likeliest


def test_tokens_join_to_the_text_wherever_it_ends(server, tiny_model_dir, ref):
    """Cut after each token in turn, some inside a multi-byte character (the tiny model emits stray
    bytes): the tokens' texts always join to the returned text."""
    tok, _ = ref
    gen = hf_greedy_ids(tiny_model_dir, tok("once upon a time")["input_ids"], 12)
    assert any("\ufffd" in tok.decode(gen[:n]) for n in range(1, 13))     # some cut ends mid-character
    for n in range(1, 13):
        choice = completion(server, prompt="once upon a time", max_tokens=n, logprobs=0)["choices"][0]
        assert "".join(choice["logprobs"]["tokens"]) == choice["text"], n
        assert len(choice["logprobs"]["tokens"]) == n


def test_logprobs_are_of_the_raw_distribution_whatever_the_temperature(server):
    """Sampling at temperature 1.7 reports the same (untempered) distribution as greedy decoding."""
    hot = completion(server, prompt="the big dog", max_tokens=4, logprobs=5, temperature=1.7, seed=3)
    cold = completion(server, prompt="the big dog", max_tokens=4, logprobs=5)
    h, c = hot["choices"][0]["logprobs"], cold["choices"][0]["logprobs"]
    assert h["top_logprobs"][0].keys() >= c["top_logprobs"][0].keys() - {c["tokens"][0]}
    for name, v in c["top_logprobs"][0].items():
        assert abs(h["top_logprobs"][0].get(name, v) - v) <= TOL
    assert abs(h["top_logprobs"][0][h["tokens"][0]] - h["token_logprobs"][0]) <= TOL


def test_a_stop_string_cuts_the_logprobs_with_the_text(server):
    full = completion(server, prompt="the cat", max_tokens=20, logprobs=1)["choices"][0]
    stop = full["text"][len(full["text"]) // 2:][:3]
    choice = completion(server, prompt="the cat", max_tokens=20, logprobs=1, stop=stop)["choices"][0]
    assert choice["finish_reason"] == "stop" and len(choice["text"]) < len(full["text"])
    lp = choice["logprobs"]
    assert all(o < len(choice["text"]) for o in lp["text_offset"])
    assert "".join(lp["tokens"]).startswith(choice["text"])
    assert lp["tokens"] == full["logprobs"]["tokens"][:len(lp["tokens"])]


def test_chat_logprobs(server, ref, tiny_model_dir):
    tok, logprobs = ref
    msgs = [{"role": "user", "content": "hello there"}]
    r = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 6, "temperature": 0,
                                               "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    prompt = "User: hello there\nAssistant:"      # the simple template (the tiny tokenizer has none)
    ids = tok(prompt)["input_ids"]
    gen = hf_greedy_ids(tiny_model_dir, ids, 6)
    want = logprobs(ids + gen)[len(ids) - 1:-1]
    assert 0 < len(content) <= len(gen)
    for j, c in enumerate(content):
        assert abs(c["logprob"] - want[j].max().item()) <= TOL
        assert len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["logprob"] == c["logprob"]
        assert c["top_logprobs"][0]["bytes"] == c["bytes"]
    # each token's own bytes (one inside a character has its byte, not U+FFFD): they join to the text's
    raw = bytes(b for c in content for b in c["bytes"])
    assert raw.decode("utf-8", "replace") == choice["message"]["content"]
    assert all(c["bytes"] for c in content)              # every token adds bytes, even if no character yet
    plain = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 6, "temperature": 0}).json()
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"] == choice["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": "five"}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2, "stream": True}, "stream"),
    ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1, "stream": True}, "stream"),
    ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, "stream"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1, "echo": True}, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2, 600]}, "prompt"),
    ("/v1/completions", {"prompt": [1, -2]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 33}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "stream": True}, "logprobs"),
])
def test_bad_logprobs_requests_get_a_400_naming_the_field(server, path, body, param):
    r = post(server, path, {"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] and param in (err["param"] or "") + err["message"], err
