"""Next-token choice on rank 0: greedy, temperature, top-k, top-p, per-request seeded generators."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off; 0 = the likeliest token only (greedy)
    # Same seed, prompt and params: the same random draws. The same text too, almost always: the logits
    # themselves can differ in the last bits with the other requests batched beside it (the kernels sum
    # in another order; measured up to 3e-6), which can change a draw that falls on a boundary. Best
    # effort, as OpenAI documents its seed.
    seed: int | None = None

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """logits: [vocab] for one sequence; returns the chosen token id."""
    if p.temperature == 0 or p.top_p == 0:     # top_p 0 leaves one candidate: argmax's, ties included
        return int(logits.argmax())
    # In float64 with the max subtracted first: any temperature the API admits (down to 5e-324) gives
    # finite or -inf logits with the top one at 0, never inf or nan (multinomial would raise).
    logits = (logits.double() - logits.max()) / p.temperature
    if 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p   # keep the smallest prefix reaching top_p
        drop[0] = False                                      # and always the likeliest token
        logits = logits.index_fill(0, order[drop], float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
