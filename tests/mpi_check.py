"""Run under mpirun (or plain python for one rank): drive the engine directly and dump what it computed.

    mpirun -np 3 python -m mpi4py tests/mpi_check.py --model-dir DIR --cases cases.json --out result.json

cases.json: {"score": [ids...], "greedy": [[prompt ids], ...], "max_new_tokens": N, "max_batch_tokens": T,
             "sequential": false}.
Rank 0 writes {"logits": [[...]], "greedy": [[ids]...]}; the greedy prompts are submitted together so they
share micro-batches, and a prompt longer than max_batch_tokens is prefilled in chunks.
"""
import argparse
import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardline.node import start  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cases = json.loads(Path(args.cases).read_text())
    node = start(args.model_dir, slots=8, threads=1)
    if node is None:
        return 1
    if node.rank != 0:
        from shardline import worker
        worker.serve(node.stage, node.link, node.rank, node.rank == node.size - 1, should_stop=lambda: False)
        return 0

    import torch
    from transformers import AutoTokenizer

    from shardline.engine import Engine, Request
    from shardline.sampling import SamplingParams
    engine = Engine(node.stage, AutoTokenizer.from_pretrained(node.tok_dir), node.link, node.size,
                    [r["host"] for r in node.records], slots=8, max_batch_tokens=cases["max_batch_tokens"])
    result = {}

    def drive():
        try:
            # "sequential": one request at a time, so every micro-batch holds the same rows whatever the
            # number of ranks (quantized kernels round differently for different batch shapes)
            one_by_one = cases.get("sequential", False)
            score = engine.submit(Request(cases["score"], 0, want_logits=True))
            if one_by_one:
                score.done.wait(120)
            greedy = []
            for p in cases["greedy"]:
                greedy.append(engine.submit(Request(p, cases["max_new_tokens"], SamplingParams(temperature=0))))
                if one_by_one:
                    greedy[-1].done.wait(120)
            for r in [score, *greedy]:
                r.done.wait(120)
            result["logits"] = torch.cat(score.logits).tolist()
            result["greedy"] = [r.generated for r in greedy]
            result["finish"] = [r.finish_reason for r in greedy]
        finally:
            engine.stop(grace=0)

    t = threading.Thread(target=drive)
    t.start()
    code = engine.run()
    t.join()
    Path(args.out).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
