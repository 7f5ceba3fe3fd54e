"""Rank 0's HTTP API (FastAPI): /generate, OpenAI-compatible /v1/*, /health, /metrics and the chat page.

Runs on uvicorn's event loop in its own thread; requests go to the engine thread through
Engine.submit and text comes back through call_soon_threadsafe onto a per-request asyncio queue.
Every error is JSON in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, field_validator,
                      model_validator)
from starlette.exceptions import HTTPException as StarletteHTTPException

from shardline import detok
from shardline.engine import ContextLengthExceeded, Engine, EngineStopped, QueueFull, Request
from shardline.sampling import SamplingParams

STATIC = Path(__file__).parent / "static"
MAX_PROMPT_CHARS = 100_000
MAX_PROMPTS = 32          # prompts in one /v1/completions request (lm-evaluation-harness batches them)
MAX_LOGPROBS = 20         # top log probabilities per token (OpenAI's chat limit; vLLM's default)
SIMPLE_CHAT_STOP = "\nUser:"
DISCONNECT_CHECK = 0.1    # seconds between looks at whether a non-streamed request's client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None, code: str | None = None):
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers
        self.code = code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _a_number(v):
    """JSON's numbers only: pydantic's lax mode would take false as 0 and "3" as 3, which the schema
    (integer / number) refuses; 16.0 stays an integer, as JSON Schema has it."""
    if isinstance(v, (bool, str)):
        raise ValueError(f"{v!r} is not a number")
    return v


Int = Annotated[int, BeforeValidator(_a_number)]
Float = Annotated[float, BeforeValidator(_a_number)]


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def null_means_default(cls, data):
        # OpenAI's schema makes these fields nullable ("temperature": null = the default); clients send it.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    temperature: Float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    # OpenAI's schema admits 0 <= top_p <= 1 (and transformers' and llama.cpp's samplers take 0): 0 keeps
    # the likeliest token only, i.e. greedy whatever the temperature
    top_p: Float = Field(1.0, ge=0.0, le=1.0)
    top_k: Int = Field(0, ge=0, description="extension: keep the k likeliest tokens (0 = off)")
    seed: Int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the text")


class GenerateBody(Sampling):
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: Int = Field(32, ge=1, le=100_000)
    temperature: Float = Field(0.0, ge=0.0, le=2.0, description="0 (default) = greedy")


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


# OpenAI parameters this server cannot honour: accepted at their no-op value (clients send those), a 400
# naming them otherwise, rather than an answer that silently ignored them.
UNSUPPORTED = {"logit_bias": lambda v: not v, "frequency_penalty": lambda v: v == 0,
               "presence_penalty": lambda v: v == 0, "best_of": lambda v: v in (None, 1),
               "suffix": lambda v: not v, "tools": lambda v: not v, "functions": lambda v: not v,
               # without tools, "none" and "auto" both mean no tool call; "required" or a named tool cannot be met
               "tool_choice": lambda v: v in (None, "none", "auto"), "function_call": lambda v: v in (None, "none", "auto"),
               "response_format": lambda v: not v or (isinstance(v, dict) and v.get("type") == "text")}


class OpenAIBody(Sampling):
    @model_validator(mode="before")
    @classmethod
    def refuse_what_is_not_honoured(cls, data):
        if isinstance(data, dict):
            bad = [k for k, ok in UNSUPPORTED.items() if k in data and data[k] is not None and not ok(data[k])]
            if bad:
                raise ValueError(f"{', '.join(bad)}: not supported by this server (leave out, or at the default)")
        return data

    model: str | None = None
    max_tokens: Int | None = Field(None, ge=1, le=100_000)
    max_completion_tokens: Int | None = Field(None, ge=1, le=100_000)
    n: Int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]   # strict: true is not token 1


class CompletionBody(OpenAIBody):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        ..., description=f"a string, a list of token ids, or a list of up to {MAX_PROMPTS} of either (one choice each)")
    echo: StrictBool = False
    max_tokens: Int | None = Field(None, ge=0, le=100_000, description="0 only with echo: score the prompt")
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="log probabilities of each token and of its k likeliest alternatives")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str = Field(..., max_length=MAX_PROMPT_CHARS,
                         description="a string, or OpenAI's list of content parts (text parts only)")

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v):
        """OpenAI's content parts ([{"type": "text", "text": ...}], what LangChain and Open WebUI send)
        become one string, joined by newlines as vLLM joins them; any other part is refused."""
        if not isinstance(v, list):
            return v
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
            raise ValueError('only text parts ({"type": "text", "text": ...}) are supported: this model reads '
                             "text, not images or audio")
        return "\n".join(p["text"] for p in v)


class ChatBody(OpenAIBody):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true")


# ---- what the API answers, for the OpenAPI schema (the handlers build plain dicts of these shapes) ----

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error, in OpenAI's shape."""
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateReply(BaseModel):
    text: str = Field(..., description="the continuation only")
    tokens: int
    prompt_tokens: int
    finish_reason: Literal["stop", "length"]
    seconds: float
    tokens_per_second: float | None


class CompletionLogprobs(BaseModel):
    """Per token of the returned text (the echoed prompt first): the prompt's first token has no
    log probability (null); top_logprobs holds the k likeliest tokens plus the chosen one."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatReplyMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: ChatReplyMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class StageInfo(BaseModel):
    rank: int
    host: str
    layers: list[int]
    rss_mb: float | None = None
    load_seconds: float | None = None
    device: str = "cpu"
    fp32_matmul: Literal["onednn", "aten"] | None = None     # the float kernel (SHARDLINE_FP32_MATMUL)
    idle_policy: Literal["batch", "normal"] | None = None    # how a waiting rank sleeps (SHARDLINE_IDLE_POLICY)


class Quantization(BaseModel):
    scheme: Literal["int8", "int4"]
    group_size: int | None = None        # int4's group along the input dimension
    head: Literal["int8", "int4", "float32"] | None = None   # the embedding and LM head's scheme


class Health(BaseModel):
    status: Literal["ok", "stopping", "failed"]
    model: str
    random_weights: bool
    ranks: int
    slots: int
    max_context: int
    wire_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    family: str = "gpt2"
    quantization: Quantization | None = None
    stages: list[StageInfo]
    active_sequences: int
    queue_depth: int
    error: str | None = None


ERRORS = {"4XX": {"model": ErrorBody, "description": "a bad request (400), a missing or wrong API key (401), an "
                  "unknown model (404), a body over the limit (413)"},
          500: {"model": ErrorBody, "description": "this request failed on its own (its sampling, its text, or "
                "non-finite logits from a broken model); others go on, and retrying it fails again"},
          503: {"model": ErrorBody, "description": "busy (the queue is full), shutting down, or a rank failed; "
                "see Retry-After"}}
# With stream: true, server-sent events; the schema is one event's (OpenAPI 3.1 has no itemSchema yet).
SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "one chunk in OpenAI's format (JSON; "
                            "`{\"error\": ...}` if the request failed mid-stream), then the last event: `[DONE]`"},
                   "event": {"type": "string"}}}}}


class BodyLimit:
    """ASGI middleware: a POST body over `limit` bytes gets 413 before the app sees it, chunked or not.

    (A Content-Length check alone lets a chunked upload of any size into memory.) Bodies within the
    limit are read here and replayed to the app; later receive() calls (disconnects) pass through."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"").decode("latin-1")
        over = bool(length) and (not length.isdigit() or int(length) > self.limit)
        # An oversized body is still read (and dropped) up to `drain` bytes: closing on unread data makes
        # the kernel reset the connection, and a client still sending (no Expect: 100-continue) never
        # sees the 413. Past `drain`, or when the client waits for 100-continue, reply at once.
        drain = 0 if headers.get(b"expect", b"").lower() == b"100-continue" else self.limit + (8 << 20)
        chunks, size = [], 0
        more = not over or (length.isdigit() and int(length) <= drain)
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size <= self.limit:
                chunks.append(body)
            more = msg.get("more_body", False) and size <= max(self.limit, drain)
        if over or size > self.limit:
            reply = JSONResponse(error_body(f"request body over {self.limit} bytes", "invalid_request_error",
                                            code="body_too_large"), status_code=413, headers={"Connection": "close"})
            return await reply(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, replay, send)


class Guard:
    """ASGI middleware: the API key (401 without it, except on the open paths and CORS preflights) and
    the request counter by endpoint and status. Plain ASGI, not @app.middleware("http"): Starlette's
    BaseHTTPMiddleware hides a client's disconnect from the app (measured: a non-streamed request whose
    client had hung up ran to its last token), so it could not cancel what nobody waits for."""
    OPEN = frozenset({"/health", "/", "/favicon.ico"})
    COUNTED = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})

    def __init__(self, app, api_key: str | None, metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key and path not in self.OPEN and scope["method"] != "OPTIONS":
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                reply = JSONResponse(error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                                "authentication_error", code="invalid_api_key"), status_code=401)
                return await reply(scope, receive, send)
        if path not in self.COUNTED:
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, counted)


def create_app(engine: Engine, tokenizer, info: dict, model_name: str, api_key: str | None = None,
               cors_origins: list[str] | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    # Every route documents OpenAI-shaped errors ("4XX" also keeps FastAPI from listing its own 422,
    # which this API never sends: a body that fails validation is a 400).
    app = FastAPI(title="shardline", version="0.1.0", responses=ERRORS,
                  description="A language model split by layers over a cluster of small boards.")
    metrics = engine.metrics
    created = int(time.time())
    chat_template = getattr(tokenizer, "chat_template", None)

    # Middleware order, outermost first: CORS (so preflights and error replies carry its headers),
    # then the API-key guard and request counter, then the body limit. Starlette wraps the last added
    # around the others, hence the reverse order below.
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(Guard, api_key=api_key, metrics=metrics)

    if cors_origins:   # a preflight (OPTIONS, no Authorization header) is answered here, before the guard
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status,
                            headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":   # its loc is ("body", character offset)
            at = first.get("loc", ("", "?"))[-1]
            why = (first.get("ctx") or {}).get("error", "JSON decode error")
            return JSONResponse(error_body(f"the body is not valid JSON ({why} at character {at})",
                                           "invalid_request_error", code="invalid_json"), status_code=400)
        loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                        for e in err.errors()[:5])
        return JSONResponse(error_body(msg or "invalid request", "invalid_request_error", loc), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    # ---- helpers ----
    def encode(text: str, special_tokens: bool = True) -> list[int]:
        # JSON may carry lone surrogates ("\ud800") that some validators let through; the tokenizer
        # raises TypeError on them (a 500), so refuse them here.
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise APIError(400, f"prompt: not valid Unicode ({err.reason} at character {err.start})",
                               param="prompt") from None
        return tokenizer(text, add_special_tokens=special_tokens)["input_ids"]

    def start(prompt_ids: list[int], max_tokens: int, body: Sampling, extra_stop: tuple[str, ...] = (),
              logprobs: int | None = None, prompt_logprobs: int | None = None, param: str = "prompt"):
        """Submit to the engine; returns (request, asyncio queue of ('text', str) / ('done', None))."""
        stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = Request(prompt_ids, max_tokens,
                      SamplingParams(body.temperature, body.top_k, body.top_p, body.seed), tuple(stop) + extra_stop,
                      on_text=lambda r, d: loop.call_soon_threadsafe(events.put_nowait, ("text", d)),
                      on_finish=lambda r: loop.call_soon_threadsafe(events.put_nowait, ("done", None)),
                      logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        try:
            engine.submit(req)
        except ValueError as err:
            code = "context_length_exceeded" if isinstance(err, ContextLengthExceeded) else None
            raise APIError(400, str(err), param=param, type_="invalid_request_error", code=code) from None
        except QueueFull as err:
            raise APIError(503, f"server busy: {err}; retry later", "server_busy", headers={"Retry-After": "1"}) from None
        except EngineStopped as err:
            raise APIError(503, str(err), "service_unavailable", headers={"Retry-After": "5"}) from None
        return req, events

    async def wait(req: Request, events: asyncio.Queue, http: HTTPRequest) -> None:
        """Wait for the end of a non-streamed request; cancel it if the client goes away (looked at
        every DISCONNECT_CHECK seconds, whether text is coming or not: a request that is generating is
        the costly one to leave running for nobody)."""
        checked = time.monotonic()
        while not req.done.is_set():
            try:
                await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK)
            except asyncio.TimeoutError:
                pass
            if time.monotonic() - checked >= DISCONNECT_CHECK:
                checked = time.monotonic()
                if await http.is_disconnected():
                    engine.cancel(req)
                    raise APIError(499, "client disconnected")
        if req.error and req.error_internal:          # this request's own failure: a retry meets it again
            raise APIError(500, req.error, "server_error")
        if req.error:
            raise APIError(503, req.error, "service_unavailable", headers={"Retry-After": "5"})

    def max_tokens_of(body: OpenAIBody, default: int, prompt_ids: list[int]) -> int:
        # Asked for: must fit the context (the engine says 400 otherwise). Not asked for: OpenAI's
        # default, cut to the room the prompt leaves (at least 1, so an over-long prompt still gets its 400).
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return asked if asked is not None else max(1, min(default, engine.max_context - len(prompt_ids)))

    def texts_after(context: list[int], ids: list[int]) -> list[str]:
        """The text each of ids would add after context (seeded as the stream is, so a SentencePiece
        word keeps its leading space; a byte of an unfinished character shows as U+FFFD)."""
        backend = tokenizer.backend_tokenizer
        decode = lambda c: backend.decode(c, skip_special_tokens=False)  # noqa: E731
        ctx = detok.seed(decode, context)
        head = decode(ctx) if ctx else ""
        out = []
        for i in ids:
            full = decode(ctx + [i])
            out.append(full[len(head):] if full.startswith(head) else decode([i]))
        return out

    def echo_of(ids: list[int], text: str | None) -> tuple[str, list[str]]:
        """(the echoed prompt, what each of its tokens adds to it): the prompt as its tokens decode, with
        special tokens (a token-id prompt shows the ones it has), except those the tokenizer put before
        a string prompt (a BOS), which add nothing: the pieces join to the echoed text, so each token's
        text_offset points into it. An unfinished character at the end is U+FFFD, in the last piece."""
        special = set(tokenizer.all_special_ids)
        lead = 0
        while text is not None and lead < len(ids) and ids[lead] in special \
                and not text.startswith(tokenizer.decode(ids[:lead + 1])):
            lead += 1
        got = [""] * lead + detok.pieces(tokenizer.backend_tokenizer, ids[lead:], (), skip_special_tokens=False)
        joined, whole = "".join(got), tokenizer.decode(ids[lead:])
        if got and whole.startswith(joined) and len(whole) > len(joined):
            got[-1] += whole[len(joined):]
        return "".join(got), got

    def logprob_entries(req: Request, echo: tuple[list[int], list[str]] | None, text: str) -> list[tuple]:
        """(token's text in the returned text, log p or None, [(alternative's text, log p)] or None,
        offset in text) per token of the returned text: the echoed prompt's (echo: its ids and pieces;
        the first has no log probability), then the generated ones up to where a stop string cut the
        text. An alternative is named by the text it would have added there, and the chosen token by its
        text in the returned text, so that top_logprobs[i] holds tokens[i] under the same spelling (a
        SentencePiece word alone would lose its leading space)."""
        entries, pieces = [], []   # (id, logprob or None, [(id, logprob)] or None)
        if echo is not None:
            echo_ids, pieces = echo[0], list(echo[1])
            entries.append((echo_ids[0], None, None))
            entries += [(i, lp, top) for i, (lp, top) in zip(echo_ids[1:], req.prompt_token_logprobs)]
        prompt_entries = len(entries)
        entries += [(i, lp, top) for i, (lp, top) in zip(req.generated, req.token_logprobs)]
        # what each generated token added, as the engine's stream (seeded with the prompt) had it
        pieces += detok.pieces(tokenizer.backend_tokenizer, req.generated[:len(req.token_logprobs)], req.prompt_ids)
        ids = list(req.prompt_ids) + list(req.generated)
        start = 0 if echo is not None else len(req.prompt_ids)     # entries[k] is ids[start + k]
        n = len(entries)
        while req.cut and n > prompt_entries and sum(map(len, pieces[:n - 1])) >= len(text):
            n -= 1                         # past where a stop string cut the text
        # the text ends in an incomplete character, which the final decode shows as U+FFFD
        tail = text[sum(map(len, pieces[:n])):] if n > prompt_entries and not req.cut else ""
        out, offset = [], 0
        for k, ((chosen, lp, top), piece) in enumerate(zip(entries[:n], pieces)):
            piece += tail if k == n - 1 else ""
            if top is not None:
                names = texts_after(ids[:start + k], [i for i, _ in top])
                top = [(piece if i == chosen else name, v) for (i, v), name in zip(top, names)]
            out.append((piece, lp, top, offset))
            offset += len(piece)
        return out

    def completion_logprobs(req: Request, echo: tuple[list[int], list[str]] | None, text: str) -> dict:
        """OpenAI's legacy completions logprobs: top_logprobs has the k likeliest tokens and the chosen one."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for piece, lp, top, offset in logprob_entries(req, echo, text):
            out["tokens"].append(piece)
            out["token_logprobs"].append(lp)
            if top is None:
                out["top_logprobs"].append(None)
            else:
                d = dict(reversed(top))          # a text two ids share keeps the likelier one's value
                d.setdefault(piece, lp)
                out["top_logprobs"].append(d)
            out["text_offset"].append(offset)
        return out

    def chat_logprobs(req: Request) -> dict:
        """OpenAI's chat logprobs: each generated token with its own bytes (a token that is part of a
        character carries just its bytes: joined, they make the character) and the k likeliest tokens."""
        entries = logprob_entries(req, None, req.text)
        tops = [[i for i, _ in top] for _, top in req.token_logprobs[:len(entries)]]
        ids = sorted(set(req.generated[:len(entries)]) | {i for t in tops for i in t})
        raw = dict(zip(ids, detok.token_bytes(tokenizer, ids)))

        def item(name, lp, i):
            return {"token": name, "logprob": lp, "bytes": list(raw[i])}
        return {"content": [{**item(piece, lp, req.generated[k]),
                             "top_logprobs": [item(n, v, i) for (n, v), i in zip(top, tops[k])]}
                            for k, (piece, lp, top, _) in enumerate(entries)]}

    def usage(req: Request) -> dict:
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.generated),
                "total_tokens": len(req.prompt_ids) + len(req.generated)}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(req: Request, events: asyncio.Queue, make_chunk, include_usage: bool):
        """Server-sent events in OpenAI's format; a client that disconnects frees its slot. With
        include_usage, every chunk carries "usage": null and one last chunk, with no choices, the counts."""
        def chunk(delta, finish):
            c = make_chunk(delta, finish)
            if c is not None and include_usage:
                c["usage"] = None
            return c
        try:
            first = chunk(None, None)
            if first is not None:
                yield sse(first)
            while True:
                kind, delta = await events.get()
                if kind == "text":
                    yield sse(chunk(delta, None))
                    continue
                if req.error:
                    yield sse(error_body(req.error, "server_error" if req.error_internal else "service_unavailable"))
                else:
                    yield sse(chunk("", req.finish_reason))
                    if include_usage:
                        last = chunk("", None)
                        last["choices"], last["usage"] = [], usage(req)
                        yield sse(last)
                yield "data: [DONE]\n\n"
                return
        finally:
            if not req.done.is_set():
                engine.cancel(req)

    # ---- endpoints ----
    @app.get("/health", responses={200: {"model": Health}, 503: {"model": Health, "description": "stopping or failed"}})
    async def health():
        status = "failed" if engine.failed else "stopping" if engine.stopping.is_set() else "ok"
        body = {"status": status, **info, "active_sequences": len(engine.active), "queue_depth": engine.queue_depth}
        if engine.failed:
            body["error"] = engine.failed
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.post("/generate", responses={200: {"model": GenerateReply}})
    async def generate(body: GenerateBody, http: HTTPRequest):
        """Plain generation: the continuation of `prompt` (temperature 0 = greedy, the default)."""
        t0 = time.monotonic()
        req, events = start(encode(body.prompt), body.max_new_tokens, body)
        await wait(req, events, http)
        took = time.monotonic() - t0
        return {"text": req.text, "tokens": len(req.generated), "prompt_tokens": len(req.prompt_ids),
                "finish_reason": req.finish_reason, "seconds": round(took, 4),
                "tokens_per_second": round(len(req.generated) / took, 2) if took > 0 else None}

    @app.get("/v1/models", responses={200: {"model": ModelList}})
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "shardline"}]}

    def check_model(body: OpenAIBody) -> None:
        if body.model not in (None, model_name):
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", type_="not_found_error")

    def completion_prompts(body: CompletionBody) -> list[tuple[list[int], str | None]]:
        """(token ids, the string or None) of each prompt: strings are encoded, token ids (what
        lm-evaluation-harness sends) taken as they are (Engine.submit checks them against the model's
        vocabulary, as it does every prompt)."""
        p = body.prompt
        items = [p] if isinstance(p, str) or (p and all(isinstance(v, int) for v in p)) else list(p)
        if not 1 <= len(items) <= MAX_PROMPTS:
            raise APIError(400, f"prompt: a string, a list of token ids, or a list of 1 to {MAX_PROMPTS} of "
                           "either", param="prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                if not item or len(item) > MAX_PROMPT_CHARS:
                    raise APIError(400, f"prompt: each string must have 1 to {MAX_PROMPT_CHARS} characters",
                                   param="prompt")
                out.append((encode(item), item))
                continue
            if not item:
                raise APIError(400, "prompt: an empty list of token ids", param="prompt")
            out.append((list(item), None))
        return out

    @app.post("/v1/completions", responses={200: {"model": Completion, "content": SSE}})
    async def completions(body: CompletionBody, http: HTTPRequest):
        check_model(body)
        prompts = completion_prompts(body)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 generates nothing; it is for scoring a prompt with echo: true "
                           "and logprobs", param="max_tokens")
        if body.stream and (len(prompts) > 1 or body.logprobs is not None):
            raise APIError(400, "stream: one prompt and no logprobs when streaming; ask without stream "
                           "for several prompts or for logprobs", param="stream")
        k = body.logprobs
        reqs = []
        try:
            for ids, _ in prompts:
                reqs.append(start(ids, max_tokens_of(body, 16, ids), body, logprobs=k,
                                  prompt_logprobs=k if body.echo else None))
        except APIError:
            for r, _ in reqs:             # all or nothing
                engine.cancel(r)
            raise
        rid = f"cmpl-{uuid.uuid4().hex}"
        echoes = [echo_of(ids, text) for ids, text in prompts] if body.echo else None
        echo = echoes[0][0] if echoes else ""

        def chunk(delta, finish):
            if delta is None:
                return None if not echo else chunk(echo, None)
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"text": delta, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            req, events = reqs[0]
            return StreamingResponse(stream(req, events, chunk, bool(body.stream_options and body.stream_options.include_usage)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            for req, events in reqs:
                await wait(req, events, http)
        finally:
            for req, _ in reqs:
                if not req.done.is_set():
                    engine.cancel(req)
        choices = []
        for i, ((req, _), (ids, _)) in enumerate(zip(reqs, prompts)):
            full = (echoes[i][0] if echoes else "") + req.text
            choices.append({"text": full, "index": i, "finish_reason": req.finish_reason,
                            "logprobs": None if k is None else completion_logprobs(
                                req, (ids, echoes[i][1]) if echoes else None, full)})
        counts = [usage(req) for req, _ in reqs]
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": {f: sum(c[f] for c in counts) for f in counts[0]}}

    def chat_prompt(messages: list[ChatMessage]) -> tuple[str, tuple[str, ...]]:
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
        if chat_template:
            from jinja2 import TemplateError, TemplateSyntaxError
            try:
                return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), ()
            except Exception as err:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
                if isinstance(err, TemplateError) and not isinstance(err, TemplateSyntaxError):
                    # templates refuse what their model was not trained on (raise_exception): Mistral's v0.1
                    # a system message, Llama 2's two user turns in a row
                    raise APIError(400, f"messages: the model's chat template refuses them: {err}",
                                   param="messages") from None
                # one that does not compile (an undefined filter too) or breaks (a TypeError in its Jinja) is
                # the split's fault, not the request's
                what = "does not compile" if isinstance(err, TemplateSyntaxError) else "failed"
                raise APIError(500, f"the model's chat template {what} ({type(err).__name__}: {err}); check "
                               "tokenizer/chat_template.jinja in the split", "server_error") from None
        # The simple template for base models without one (documented in the README).
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs) + "Assistant:"
        return text, (SIMPLE_CHAT_STOP,)

    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletion, "content": SSE}})
    async def chat(body: ChatBody, http: HTTPRequest):
        check_model(body)
        prompt, extra_stop = chat_prompt(body.messages)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise APIError(400, f"messages: over {MAX_PROMPT_CHARS} characters in all", param="messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        if body.stream and body.logprobs:
            raise APIError(400, "logprobs: not with stream: true; ask without stream for logprobs", param="logprobs")
        ids = encode(prompt, special_tokens=not chat_template)   # a template writes its own BOS, if any
        req, events = start(ids, max_tokens_of(body, 256, ids), body, extra_stop,
                            logprobs=(body.top_logprobs or 0) if body.logprobs else None, param="messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(delta, finish):
            d = {"role": "assistant", "content": ""} if delta is None else ({"content": delta} if delta else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return StreamingResponse(stream(req, events, chunk, bool(body.stream_options and body.stream_options.include_usage)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await wait(req, events, http)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": req.text},
                             "logprobs": chat_logprobs(req) if body.logprobs else None,
                             "finish_reason": req.finish_reason}], "usage": usage(req)}

    return app
