"""shardline.sampling.sample on hand-made logits: what each parameter leaves to draw from."""
import pytest
import torch

from shardline.sampling import SamplingParams, sample

LOGITS = torch.tensor([0.5, 3.0, 3.0, -1.0, 2.9])    # a tie at the top: argmax picks index 1


@pytest.mark.parametrize("params, allowed, reached", [
    # (parameters, the tokens it may draw, those 300 seeded draws must include)
    (SamplingParams(temperature=0), {1}, {1}),
    (SamplingParams(temperature=2.0, top_p=0), {1}, {1}),              # one candidate: argmax's, ties included
    (SamplingParams(temperature=2.0, top_k=1), {1, 2}, {1, 2}),        # the k-th value keeps both ties
    (SamplingParams(temperature=2.0, top_k=3), {1, 2, 4}, {1, 2, 4}),
    (SamplingParams(temperature=1.0, top_p=1e-9), {1, 2}, set()),      # the first after sorting: either tie
    (SamplingParams(temperature=2.0), {0, 1, 2, 3, 4}, {0, 1, 2, 4}),
])
def test_each_parameter_leaves_the_tokens_it_should(params, allowed, reached):
    got = {sample(LOGITS, params, SamplingParams(params.temperature, seed=s).generator()) for s in range(300)}
    assert reached <= got <= allowed


def test_the_same_seed_draws_the_same_tokens():
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=5)
    draws = [[sample(LOGITS, p, g) for _ in range(20)] for g in (p.generator(), p.generator())]
    assert draws[0] == draws[1]
