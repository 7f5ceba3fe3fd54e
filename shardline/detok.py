"""Token ids to text as they are generated: tokenizers' DecodeStream, seeded with the prompt's last
tokens and guarded against its one known failure.

- Context: a SentencePiece-style tokenizer (Llama 2, TinyLlama, Mistral, most GGUF files) drops the
  space of a sequence's first word ("▁on" alone decodes to "on"), so a stream started on the
  generated tokens alone would glue the first word to the prompt ("The cat" + "sat"). Seeded with
  the prompt's last CONTEXT tokens, each token adds what it adds after the prompt, as vLLM and TGI
  also do.
- Recovery: DecodeStream.step raises "Invalid prefix encountered" when a byte-fallback token changes
  text it already returned (an ASCII byte, then an unfinished multi-byte character, then another
  token: vllm-project/vllm#17448). vLLM restarts the stream and steps again; so does this (bare: seeded
  with the ids that broke it, a stream returns them again). A restart costs at most a character of
  the streamed text (the new stream cannot know the bytes before), never a request.
"""
from __future__ import annotations

import functools
import re

from tokenizers.decoders import DecodeStream

CONTEXT = 8                   # prompt tokens a stream sees before the first generated one
INVALID_PREFIX = "Invalid prefix encountered"


class TextStream:
    """What each new token adds to the text of context + the tokens so far (see the module's doc)."""

    def __init__(self, backend, context=(), skip_special_tokens: bool = True):
        self.backend, self.skip = backend, skip_special_tokens
        self.recent = seed(lambda ids: backend.decode(ids, skip_special_tokens=self.skip), context)
        self.stream = self._new(self.recent)

    def _new(self, ids: list[int]) -> DecodeStream:
        return DecodeStream(ids=ids, skip_special_tokens=self.skip) if ids else DecodeStream(skip_special_tokens=self.skip)

    def step(self, token: int) -> str:
        """The text `token` adds ("" while it ends inside a multi-byte character)."""
        try:
            out = self.stream.step(self.backend, token)
        except Exception as err:  # tokenizers raises a plain Exception
            if INVALID_PREFIX not in str(err):
                raise
            out = self._restart(token)
        self.recent = (self.recent + [token])[-CONTEXT:]
        return out or ""

    def _restart(self, token: int) -> str | None:
        self.stream = self._new([])   # seeded with the ids that broke it, it returns them again
        try:
            return self.stream.step(self.backend, token)
        except Exception as err:  # one token alone has no prefix to break
            if INVALID_PREFIX not in str(err):
                raise
            self.stream = self._new([])
            return None


def seed(decode, context) -> list[int]:
    """The context's last CONTEXT ids, less any that end inside a multi-byte character: a stream seeded
    with half a character returns the seed's text again with the next token (measured)."""
    ids = list(context)[-CONTEXT:]
    while ids and decode(ids).endswith("\ufffd"):
        ids.pop()
    return ids


def added_text(tokenizer, ids: list[int], context=(), skip_special_tokens: bool = True) -> str:
    """The text ids add after context, in one decode: decode(context + ids) past decode(context) (a
    whole-text decode knows every byte, so an unfinished character at the end shows as U+FFFD)."""
    context = seed(lambda c: tokenizer.decode(c, skip_special_tokens=skip_special_tokens), context)
    full = tokenizer.decode(context + list(ids), skip_special_tokens=skip_special_tokens)
    head = tokenizer.decode(context, skip_special_tokens=skip_special_tokens) if context else ""
    return full[len(head):] if full.startswith(head) else tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def pieces(backend, ids: list[int], context=(), skip_special_tokens: bool = True) -> list[str]:
    """What each id adds, in order: the pieces join to the streamed text of ids after context."""
    stream = TextStream(backend, context, skip_special_tokens)
    return [stream.step(i) for i in ids]


_KINDS: dict[int, str] = {}
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _kind(backend) -> str:
    """How the tokenizer model spells bytes: "bytelevel" (GPT-2's byte table: GPT-2, Llama 3, Qwen,
    SmolLM2), "bytefallback" (sentencepiece: ▁ for a space, <0xNN> for a byte), or "text"."""
    kind = _KINDS.get(id(backend))
    if kind is None:
        import json
        dec = json.loads(backend.to_str()).get("decoder") or {}
        types = {dec.get("type")} | {d.get("type") for d in dec.get("decoders", [])}
        kind = ("bytelevel" if "ByteLevel" in types else
                "bytefallback" if types & {"ByteFallback", "Metaspace"} else "text")
        _KINDS[id(backend)] = kind
    return kind


@functools.cache
def _byte_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """Each token's own bytes (OpenAI's logprobs `bytes`): what it adds to the byte string of a text,
    so a token that is part of a character gives just its bytes. Added and special tokens give their
    text."""
    backend = tokenizer.backend_tokenizer
    kind, added = _kind(backend), tokenizer.added_tokens_decoder
    table = _byte_table() if kind == "bytelevel" else {}
    out = []
    for i in ids:
        piece = backend.id_to_token(i)
        if i in added or piece is None:
            out.append(str(added[i].content if i in added else "").encode())
        elif kind == "bytelevel" and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        elif kind == "bytefallback":
            m = _BYTE.fullmatch(piece)
            out.append(bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode())
        else:
            out.append(backend.decode([i]).encode())
    return out
