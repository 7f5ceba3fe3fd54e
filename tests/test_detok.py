"""Generated ids to text (shardline/detok.py) on the tokenizers users' files carry: a sentencepiece
vocabulary with byte fallback (Llama 2, TinyLlama, Mistral, most GGUF files) and byte-level BPE.

- The first generated word keeps its space: "The cat" + "▁sat" reads "The cat sat", not "The catsat".
- The byte sequence that makes tokenizers' DecodeStream raise (vllm-project/vllm#17448) costs at
  most a character of the stream, never the request (and, over the server, never the others).
- The echoed prompt's tokens point into the echoed text, with the tokenizer's own BOS adding nothing.
"""
from __future__ import annotations

import pytest
import torch
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from shardline.detok import TextStream, added_text, pieces
from tests.gguf_util import SPM_VOCAB, Q, uniform, write_gguf

LLAMA = {"vocab_size": SPM_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 1,
         "eos_token_id": 2, "initializer_range": 0.3}   # clear greedy margins


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """(a sentencepiece GGUF file of a tiny Llama, transformers' tokenizer from it)."""
    from tests.gguf_util import SPM_PIECES
    d = tmp_path_factory.mktemp("spm")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    with torch.no_grad():   # only word-initial pieces ("▁the") can win: every continuation starts with a space
        words = [3 + 256 + k for k, p in enumerate(SPM_PIECES) if p.startswith("▁") and len(p) > 1]
        keep = torch.zeros(SPM_VOCAB, 1)
        keep[words] = 1
        model.lm_head.weight.mul_(keep)
    path = write_gguf(d / "model.gguf", model, "sentencepiece", uniform(Q.Q8_0))
    return path, AutoTokenizer.from_pretrained(str(d), gguf_file=path.name)


def ids_of(tok, pieces_: list[str]) -> list[int]:
    ids = tok.convert_tokens_to_ids(pieces_)
    assert tok.unk_token_id not in ids, pieces_
    return ids


def test_the_first_generated_word_keeps_its_space(spm):
    _, tok = spm
    prompt, gen = ids_of(tok, ["<s>", "▁the", "▁w", "or", "ld"]), ids_of(tok, ["▁hello", "▁a"])
    whole = tok.decode(prompt + gen, skip_special_tokens=True)
    want = whole[len(tok.decode(prompt, skip_special_tokens=True)):]
    assert want == " hello a"
    bare = DecodeStream(skip_special_tokens=True)
    assert "".join(bare.step(tok.backend_tokenizer, i) or "" for i in gen) == "hello a"   # what it was
    assert "".join(pieces(tok.backend_tokenizer, gen, prompt)) == want
    assert added_text(tok, gen, prompt) == want


def test_the_byte_sequence_that_breaks_decodestream_costs_no_request(spm):
    """An ASCII byte, then the first byte of a 3-byte character, then a letter: the whole decode turns the
    newline into U+FFFD after the fact, which DecodeStream reports by raising."""
    _, tok = spm
    ids = ids_of(tok, ["a", "<0x0A>", "<0xE3>", "a", "▁the"])
    bare = DecodeStream(skip_special_tokens=True)
    with pytest.raises(Exception, match="Invalid prefix"):
        for i in ids:
            bare.step(tok.backend_tokenizer, i)
    stream = TextStream(tok.backend_tokenizer)
    got = [stream.step(i) for i in ids]
    assert got[:3] == ["a", "\n", ""] and got[3].endswith("a") and got[4] == " the"
    assert added_text(tok, ids) == tok.decode(ids, skip_special_tokens=True)


def test_a_prompt_ending_inside_a_character_is_not_returned_again(tiny_model_dir):
    """Byte-level BPE: a token-id prompt may stop inside a character. The pieces after it join to the
    text the whole decode adds, and never repeat the prompt's text."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode("é€ ok and more", add_special_tokens=False)
    cuts = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd")]
    assert cuts, "no cut inside a character: nothing is tested"
    for k in cuts:
        prompt, gen = tok.encode("so") + ids[:k], ids[k:]
        got = "".join(pieces(tok.backend_tokenizer, gen, prompt))
        assert got == added_text(tok, gen, prompt), k
        assert not got.startswith("so") and got.endswith(" ok and more"), (k, got)


def test_a_sentencepiece_gguf_serves_words_with_their_spaces_and_echo_offsets(spm, tmp_path):
    """Over the real server on the GGUF's split: a completion reads as transformers decodes prompt and
    continuation together, and echo's tokens (the tokenizer's BOS adding nothing) join to the text."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import http, serving, split
    path, tok = spm
    parts = split(path, 1, tmp_path / "parts")
    prompt = "hello the world"
    ids = tok.encode(prompt)
    assert ids[0] == tok.bos_token_id
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2,
                           attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        gen = out[0, len(ids):].tolist()
        gen = gen[:gen.index(2)] if 2 in gen else gen
        top2 = ref(out).logits[0, len(ids) - 1:len(ids) - 1 + len(gen)].topk(2).values
    assert gen and (top2[:, 0] - top2[:, 1]).min() > 1e-3, "reference logits too flat for a token comparison"
    want = added_text(tok, gen, ids)
    assert want.startswith(" "), "the continuation starts inside a word: the space is not tested"
    assert want == tok.decode(ids + gen, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
    with serving(parts, 1, tmp_path) as server:
        status, body = http("POST", server.url + "/v1/completions",
                            {"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 3})
        assert status == 200, body
        status, echo = http("POST", server.url + "/v1/completions",
                            {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 3})
        assert status == 200, echo
    choice = body["choices"][0]
    assert choice["text"] == want and "".join(choice["logprobs"]["tokens"]) == want
    lp = echo["choices"][0]["logprobs"]
    assert echo["choices"][0]["text"] == prompt and "".join(lp["tokens"]) == prompt
    assert lp["tokens"][0] == "" and lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(ids))]
    # top_logprobs spell each token as tokens does, with its space (OpenAI's clients look it up there),
    # and the alternatives as they would have read in its place
    for got in (choice["logprobs"], lp):
        tops = [(t, v, top) for t, v, top in zip(got["tokens"], got["token_logprobs"], got["top_logprobs"]) if top]
        assert tops and all(t in top and top[t] >= v for t, v, top in tops), tops   # a shared text: the likelier
        assert any(a.startswith(" ") for t, _, top in tops for a in top if a != t), "no alternative word with its space"


@pytest.mark.parametrize("kind", ["byte-level BPE", "sentencepiece"])
def test_token_bytes_join_to_the_texts_bytes(kind, spm, tiny_model_dir):
    """OpenAI's logprobs `bytes`: a token inside a character carries its own bytes, not U+FFFD."""
    from shardline.detok import token_bytes
    tok = AutoTokenizer.from_pretrained(tiny_model_dir) if kind == "byte-level BPE" else spm[1]
    text = "the world é€😀 hello"
    ids = tok.encode(text, add_special_tokens=False)
    raw = token_bytes(tok, ids)
    assert any(len(r) == 1 and r[0] >= 0x80 for r in raw), "no token inside a character: nothing is tested"
    joined = b"".join(raw).decode()
    assert joined == (text if kind == "byte-level BPE" else " " + text)   # sentencepiece: "▁the"
