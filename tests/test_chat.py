"""Chat over the real server: the model's own chat template (ChatML here, with a system message) and
generation that ends at every id of generation_config.eos_token_id (end-of-turn tokens), which never
show in the text.

The tiny model's tokenizer gets ChatML's <|im_start|>/<|im_end|> and a second end token <|eot|> as added
special tokens, and generation_config.json names both as eos_token_id. Its untied LM head is arranged
so that greedy decoding emits each end token a few tokens in: the head row of <|im_end|> (and of
<|eot|>) is a copy, 0.1 % larger, of the row of the token greedy decoding would emit there, so the
end token wins exactly where that token would have.
"""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.helpers import TINY, serving, split

# ChatML, refusing two turns of one role in a row as Llama 2's and Mistral's templates do
CHATML = ("{% for m in messages %}{% if loop.index0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
          "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|eot|>"]
MESSAGES = [{"role": "system", "content": "you are a terse cat"}, {"role": "user", "content": "where did the dog go"}]
PLAIN = "once upon a time the big dog"
web = httpx.Client(timeout=60)


def greedy(model, ids: list[int], n: int, eos: list[int] | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def end_at(model, ids: list[int], end: int, step: int) -> None:
    """Make greedy decoding of ids emit `end` at `step` (instead of the token it emits there now)."""
    head = model.lm_head.weight
    gen = greedy(model, ids, step + 1, None)
    t = next(t for t in gen[step:] if t not in gen[:step])
    with torch.no_grad():
        head[end] = head[t] * 1.001


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """(split directory, model directory, tokenizer, ids of <|im_end|> and <|eot|>, the reference model)."""
    from transformers import GenerationConfig, GPT2Config

    from splitter.random_model import build_tokenizer, random_model
    out = tmp_path_factory.mktemp("chat") / "model"
    vocab = TINY["vocab_size"]
    tok = build_tokenizer(vocab - len(SPECIAL))               # ids 0..596, its EOS last
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = CHATML
    assert len(tok) == vocab
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|eot|>"])
    cfg = GPT2Config(**{**TINY, "bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id},
                     tie_word_embeddings=False)
    model = random_model(cfg, seed=1)
    chat_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    end_at(model, chat_ids, im_end, 3)
    end_at(model, tok(PLAIN)["input_ids"], eot, 4)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, eot], bos_token_id=tok.eos_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    parts = split(out, 3, tmp_path_factory.mktemp("chat_parts"))
    gen_file = parts / "tokenizer" / "generation_config.json"      # the splitter writes it beside the tokenizer
    assert json.loads(gen_file.read_text())["eos_token_id"] == [im_end, eot]
    return parts, tok, (im_end, eot), model


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    with serving(chat_model[0], 3, tmp_path_factory.mktemp("log")) as s:
        yield s


def expected(chat_model, ids: list[int]) -> tuple[list[int], int]:
    """transformers' greedy tokens with generation_config's eos ids, and the end token it stopped at."""
    _, tok, ends, model = chat_model
    gen = greedy(model, ids, 20, list(ends) + [tok.eos_token_id])
    assert gen[-1] in ends and len(gen) < 20, gen        # the model is arranged to end its turn early
    return gen[:-1], gen[-1]


def test_chat_renders_the_template_with_the_system_message_and_stops_at_end_of_turn(server, chat_model):
    _, tok, (im_end, _), _ = chat_model
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.decode(ids).startswith("<|im_start|>system\nyou are a terse cat<|im_end|>")
    want, end = expected(chat_model, ids)
    assert end == im_end
    r = web.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == tok.decode(want, skip_special_tokens=True)
    assert body["usage"]["prompt_tokens"] == len(ids)          # the system turn is in the prompt
    assert body["usage"]["completion_tokens"] == len(want)
    assert "<|im_end|>" not in choice["message"]["content"] and "<|im_start|>" not in choice["message"]["content"]


def test_the_system_message_changes_the_prompt(server, chat_model):
    _, tok, _, _ = chat_model
    user_only = MESSAGES[1:]
    r = web.post(server.url + "/v1/chat/completions", json={"messages": user_only, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    ids = tok.apply_chat_template(user_only, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.json()["usage"]["prompt_tokens"] == len(ids) < len(full)


def test_streamed_chat_stops_at_end_of_turn_too(server, chat_model):
    _, tok, _, _ = chat_model
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    want, _ = expected(chat_model, ids)
    text, finish = "", None
    with web.stream("POST", server.url + "/v1/chat/completions",
                    json={"messages": MESSAGES, "max_tokens": 20, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content", "")
                finish = choice["finish_reason"] or finish
    assert text == tok.decode(want, skip_special_tokens=True) and finish == "stop"


def test_every_generation_config_eos_id_stops_a_completion(server, chat_model):
    """The second id of generation_config.eos_token_id (<|eot|>) ends a plain completion as well."""
    _, tok, (_, eot), _ = chat_model
    want, end = expected(chat_model, tok(PLAIN)["input_ids"])
    assert end == eot
    r = web.post(server.url + "/v1/completions", json={"prompt": PLAIN, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == tok.decode(want, skip_special_tokens=True)
    assert r.json()["usage"]["completion_tokens"] == len(want)


@pytest.mark.parametrize("eos, want", [(None, set()), (7, {7}), ([7, 9], {7, 9}), ([], set())])
def test_stop_ids_come_from_generation_config(tmp_path, eos, want):
    import main
    from transformers import GenerationConfig
    assert main.stop_ids(tmp_path) == set()                  # no generation_config.json: none besides EOS
    GenerationConfig(eos_token_id=eos).save_pretrained(tmp_path)
    assert main.stop_ids(tmp_path) == want


def test_messages_the_template_refuses_get_a_400_naming_its_reason(server):
    r = web.post(server.url + "/v1/chat/completions",
                 json={"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "Conversation roles must alternate" in error["message"] and error["param"] == "messages"
    ok = web.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert ok.status_code == 200, ok.text                  # and the server serves on


@pytest.mark.parametrize("template, words", [
    ("{{ messages[0]['content'] + 1 }}", "the model's chat template failed (TypeError"),   # breaks at render
    ("{% for m in messages %}{{ m.content }}", "the model's chat template does not compile"),  # never closes
], ids=["type-error", "syntax-error"])
def test_a_broken_chat_template_is_a_500_naming_it_not_the_clients_fault(chat_model, tmp_path, template, words):
    """A template that cannot render is the split's fault: an OpenAI-shaped 500 naming the template. A
    TypeError in it gave Starlette's plain-text 500, a syntax error a 400 blaming the messages."""
    import shutil

    from shardline.manifest import sha256_file
    parts = shutil.copytree(chat_model[0], tmp_path / "parts")
    tdir = parts / "tokenizer"
    if (tdir / "chat_template.jinja").is_file():
        (tdir / "chat_template.jinja").write_text(template)
    else:
        cfg = json.loads((tdir / "tokenizer_config.json").read_text())
        (tdir / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    m = json.loads((parts / "manifest.json").read_text())
    m["tokenizer"]["files"] = {n: sha256_file(tdir / n) for n in m["tokenizer"]["files"]}
    (parts / "manifest.json").write_text(json.dumps(m))
    with serving(parts, 3, tmp_path) as s:
        r = web.post(s.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
        assert r.status_code == 500 and r.headers["content-type"].startswith("application/json"), r.text
        assert r.json()["error"]["type"] == "server_error" and words in r.json()["error"]["message"], r.text
        assert "chat_template.jinja" in r.json()["error"]["message"]
        ok = web.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text                  # the rest of the API serves on
