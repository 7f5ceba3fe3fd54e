"""A light, separate client for the overload test: how fast does a 503 come back?

    python tests/load_probe.py URL SECONDS

The 64 load clients share one asyncio loop in the test process, so on a small, busy host their own
scheduling delays pad the latencies they measure. This probe is its own process and sends one request
at a time (POST /generate, one token, then GET /health, every 0.1 s), so its 503 latencies are the
server's. Prints one JSON object: {"503": [seconds...], "200": [...], "health": [...], "other": [...]}.
"""
from __future__ import annotations

import http.client
import json
import sys
import time
from urllib.parse import urlsplit


def main() -> None:
    url, seconds = urlsplit(sys.argv[1]), float(sys.argv[2])
    out: dict[str, list] = {"503": [], "200": [], "health": [], "other": []}
    body = json.dumps({"prompt": "probe", "max_new_tokens": 1}).encode()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for method, path, payload in (("POST", "/generate", body), ("GET", "/health", None)):
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
            t0 = time.monotonic()
            try:
                conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                took = time.monotonic() - t0
                key = "health" if path == "/health" else str(r.status)
                out[key if key in out else "other"].append(took if key in out else f"{path} {r.status}")
            except OSError as err:
                out["other"].append(f"{path} {type(err).__name__}: {err}")
            finally:
                conn.close()
        time.sleep(0.1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
