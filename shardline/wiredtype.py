"""The type hidden states travel in between ranks (`main.py --wire-dtype`): float32, float16 or bfloat16.

Every rank computes in float32; a FORWARD payload is converted to the wire type just before a hop and
back to float32 just after it, so float16/bfloat16 halve the bytes per hop (slow links: Wi-Fi) at the
cost of rounding the hidden state once per hop. The type travels in the header's flags (bits 8-9),
so a receiver sizes its buffer from the header alone. NumPy has no bfloat16: it travels as its raw
16 bits (uint16) and is reinterpreted on receipt.

float16 ends at +-65504. Some models' residual streams hold a few far larger values ("massive
activations"); cast as they are, those would travel as inf, and the next norm would turn every logit
after them into NaN. They are clamped to float16's range instead (the next RMS/layer norm divides by
the row's scale, which such a value dominates either way); bfloat16 keeps float32's range and needs no
clamp, so it is the type to pick for such models.
"""
from __future__ import annotations

import numpy as np
import torch

NAMES = ("float32", "float16", "bfloat16")               # the code is the index
NUMPY = (np.float32, np.float16, np.uint16)             # what the payload buffer holds on the wire
SHIFT, MASK = 8, 3                                       # flags bits 8-9


def code(name: str) -> int:
    if name not in NAMES:
        raise ValueError(f"unknown wire dtype {name!r}; choose one of {', '.join(NAMES)}")
    return NAMES.index(name)


def flags_of(name: str) -> int:
    """The header flag bits that announce a FORWARD payload in this type."""
    return code(name) << SHIFT


def numpy_dtype(flags: int):
    """The NumPy type of a FORWARD payload whose header has these flags."""
    return NUMPY[(flags >> SHIFT) & MASK]


def encode(x: torch.Tensor, flags: int) -> np.ndarray:
    """A float32 [rows, d] tensor as the payload array for the hop (a view when already float32)."""
    c = (flags >> SHIFT) & MASK
    if c == 0:
        return x.numpy()
    if c == 1:
        big = torch.finfo(torch.float16).max
        return x.clamp(-big, big).to(torch.float16).numpy()
    return x.to(torch.bfloat16).view(torch.uint16).numpy()


def decode(payload: np.ndarray, flags: int) -> torch.Tensor:
    """A received payload as the float32 tensor the stage computes with."""
    c = (flags >> SHIFT) & MASK
    t = torch.from_numpy(payload)
    if c == 0:
        return t
    return (t.view(torch.bfloat16) if c == 2 else t).float()
