"""Is the model hub reachable? Asked once, quickly, so an offline machine never waits on retries."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, read as huggingface_hub reads it
    (1/ON/YES/TRUE), but now rather than when huggingface_hub was first imported."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = 3.0) -> bool:
    if offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                      timeout=timeout):
            return True
    except OSError:
        return False
