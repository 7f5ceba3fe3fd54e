"""Closed-loop HTTP clients (asyncio + httpx) that stream /v1/completions and stamp every chunk.

Each of N clients sends its share of a fixed list of requests one after another; the level's
aggregate is all completion tokens over the wall time from the first send to the last finish.
Time to first token is when the first text chunk arrives; the decode clock runs from that chunk to
the one that carries finish_reason. A token that ends inside a multi-byte character shows no text, so
the first text chunk may come with token k+1 rather than token 1: the decode count is then
tokens - 1 - k (bench/run.py sets it from first_text_index, the same rule as the baseline's).
Bounded: a fixed number of requests, each with a timeout.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx


async def stream_one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    t_first = t_finish = None
    text, usage, reason, error = [], None, None, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    obj = json.loads(data)
                    if "error" in obj:
                        error = obj["error"].get("message")
                        break
                    if obj.get("usage"):
                        usage = obj["usage"]
                    for ch in obj.get("choices") or []:
                        if ch.get("text"):
                            text.append(ch["text"])
                            t_first = t_first or now
                        if ch.get("finish_reason"):
                            reason, t_finish = ch["finish_reason"], now
    except httpx.HTTPError as err:
        error = f"{type(err).__name__}: {err}"
    t_end = time.perf_counter()
    t_finish = t_finish or t_end
    t_first = t_first or t_finish
    tokens = usage["completion_tokens"] if usage else 0
    return {"tokens": tokens, "prompt_tokens": usage["prompt_tokens"] if usage else 0, "finish_reason": reason,
            "error": error, "t_start": t0, "t_end": t_end, "seconds": t_end - t0, "ttft_s": t_first - t0,
            "decode_s": t_finish - t_first, "text": "".join(text)}


async def _level(url: str, prompts: list[str], clients: int, total: int, max_tokens: int,
                 timeout: float) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results: list[dict | None] = [None] * total
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout)) as client:
        async def worker(c: int) -> None:
            for i in range(c, total, clients):           # client c: requests c, c+N, c+2N, ...
                res = await stream_one(client, url, prompts[i % len(prompts)], max_tokens)
                res["client"], res["index"] = c, i
                results[i] = res
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return [r for r in results if r is not None], wall


def first_text_index(url: str, prompt: str, max_tokens: int, timeout: float = 180.0) -> int:
    """The index of the first generated token that adds text, as the server's own stream spells it:
    one untimed, non-streamed greedy request with logprobs, whose `tokens` are exactly the pieces the
    stream sends (shardline/detok.py). Asked only when a run's text differs from the baseline's, whose
    token ids then cannot stand in for the pipeline's. len(tokens) when none adds text."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=timeout)
    r.raise_for_status()
    pieces = r.json()["choices"][0]["logprobs"]["tokens"]
    return next((i for i, piece in enumerate(pieces) if piece), len(pieces))


def run_level(url: str, prompts: list[str], clients: int, total: int, max_tokens: int,
              timeout: float = 180.0) -> tuple[list[dict], float]:
    """(per-request results in request order, wall seconds) for `total` requests over `clients` clients."""
    return asyncio.run(_level(url, prompts, clients, total, max_tokens, timeout))
