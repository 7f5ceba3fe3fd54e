"""The layer plan: which contiguous layers each pipeline stage owns.

Cost is counted in matmul weights read per generated token, the thing that bounds a CPU board:
one transformer block costs its parameter count, and stage 0 also pays for the LM head
(vocab x hidden, as large as ~5.5 distilgpt2 blocks). Embedding lookups cost next to nothing.
"""
from __future__ import annotations


def plan_layers(n_layer: int, n_stages: int, layer_cost: float, head_cost: float) -> list[tuple[int, int]]:
    """Split layers [0, n_layer) into n_stages contiguous ranges [a, b) minimising the busiest stage.

    Stage 0 carries head_cost on top of its layers. Stages after 0 get at least one layer each
    (a worker without layers would only add a hop). Exact dynamic programme; n is small.
    """
    if n_stages < 1:
        raise ValueError("need at least one stage")
    if n_stages - 1 > n_layer:
        raise ValueError(f"{n_stages} stages need at least {n_stages - 1} layers for the workers; the model has {n_layer}")
    if n_stages == 1:
        return [(0, n_layer)]
    inf = float("inf")
    # best[s][i]: minimal max-cost of covering layers [i, n) with worker stages s..P-1 (each >= 1 layer)
    best = [[inf] * (n_layer + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n_layer + 1) for _ in range(n_stages + 1)]
    best[n_stages][n_layer] = 0.0
    for s in range(n_stages - 1, 0, -1):
        for i in range(n_layer - 1, -1, -1):
            for j in range(i + 1, n_layer + 1):
                cost = max((j - i) * layer_cost, best[s + 1][j])
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    # stage 0 (head + k layers), then the workers; prefer fewer layers on stage 0 on ties
    k0 = min(range(0, n_layer - (n_stages - 1) + 1),
             key=lambda k: (max(head_cost + k * layer_cost, best[1][k]), k))
    ranges, i = [(0, k0)], k0
    for s in range(1, n_stages):
        ranges.append((i, cut[s][i]))
        i = cut[s][i]
    return ranges


def check_cover(ranges, n_layer: int, label: str) -> None:
    """Raise ValueError (starting with label) unless the ranges [a, b) are contiguous, in order, and
    cover layers [0, n_layer) exactly."""
    expect = 0
    for a, b in ranges:
        if a != expect or b < a:
            raise ValueError(f"{label}: ranges must be contiguous and cover layers 0-{n_layer - 1} in order")
        expect = b
    if expect != n_layer:
        raise ValueError(f"{label} covers {expect} layers; the model has {n_layer}")


def parse_layers(spec: str, n_layer: int, allow_empty: bool = False) -> list[tuple[int, int]]:
    """Parse ``--layers 0-1,2-3,4-5`` (inclusive ranges, one per stage; ``none`` for a stage
    with no layers, e.g. ``none,0-2,3-5`` keeps only the embeddings and head on stage 0).
    allow_empty: a worker may be ``none`` too (with --boards: that board is left out)."""
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        if part in ("", "none", "-"):
            ranges.append((ranges[-1][1] if ranges else 0,) * 2)
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo) + 1
        except ValueError:
            raise ValueError(f"--layers {spec!r}: {part!r} is not a layer range such as 0-3, 5 or none") from None
        if b <= a:
            raise ValueError(f"--layers {spec!r}: {part!r} is empty (write none for a stage without layers)")
        ranges.append((a, b))
    check_cover(ranges, n_layer, f"--layers {spec!r}")
    if not allow_empty and any(a == b for a, b in ranges[1:]):
        raise ValueError(f"--layers {spec!r}: every stage after the first needs at least one layer")
    return ranges
