"""shardline: one SPMD program, one rank per board; rank 0 serves the HTTP API.

    mpirun -np 3 --hostfile hostfiles/localhost --bind-to none --enable-recovery \
        python -m mpi4py main.py --model-dir model_parts

Between boards, with Open MPI's TCP settings: hostfiles/pis.example, or Ansible's launch.sh.

With one rank (`python main.py --model-dir DIR`) the whole model runs in one process, no launcher.
Rank 0 owns the embeddings, the final norm and the LM head and runs the engine and API; ranks 1..P-1
each run a contiguous range of layers. Activations travel rank 0 -> 1 -> ... -> P-1 -> 0.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import signal
import socket
import sys
import threading
import time

from shardline import say, say_traceback

STATS_INTERVAL = 2.0  # rank 0's heartbeat through the ring, seconds (less with a short --step-timeout)


def heartbeat(step_timeout: float) -> float:
    """Seconds between heartbeats: several fit in --step-timeout, so one late beat is not a death."""
    return min(STATS_INTERVAL, step_timeout / 4)


def silence(step_timeout: float) -> float:
    """Seconds a worker hears nothing from the rank before it until it takes the job for broken: at least
    4 s over the step timeout, however short that is, for the moments after the roll call before rank 0's
    engine exists (its PINGs cover the rest of its start-up: the HTTP server's imports, the port)."""
    return step_timeout + 2 * STATS_INTERVAL


# What rank 0's waiting clients hear when the supervisor signals it with LOST_BOARD_SIGNAL.
# The engine adds the workers that did not answer its last direct question, when it asked one.
LOST_BOARD = ("the job has ended: Open MPI lost contact with one of the boards (power or network); retry shortly: "
              "the service comes back once every board answers again (GET /health names the missing one)")


def at_least(lo, kind=int, hi=None, why=""):
    """An argparse type: a number of `kind` no smaller than lo (and no larger than hi, because `why`)."""
    def check(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if v < lo:
            raise argparse.ArgumentTypeError(f"{text} is below {lo}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{text} is above {hi}{why}")
        return v
    return check


def port(text: str) -> int:
    """A TCP port; 0 lets the system pick a free one (tests)."""
    v = at_least(0)(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (0-65535)")
    return v


def device_name(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (torch's names; whether this board has that GPU is checked
    when the stage loads, shardline/stage.pick_device)."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda or cuda:N")


def parse_args(argv=None):
    from shardline import wire
    ap = argparse.ArgumentParser(description="Serve a model split over MPI ranks (see the README).")
    ap.add_argument("--model-dir", required=True, help="directory with manifest.json and stage_K.safetensors")
    ap.add_argument("--host", default=os.environ.get("SHARDLINE_HOST", "127.0.0.1"),
                    help="API bind address (default 127.0.0.1; 0.0.0.0 to serve the network)")
    ap.add_argument("--port", type=port, default=os.environ.get("SHARDLINE_PORT", "8000"))
    ap.add_argument("--slots", type=at_least(1, hi=wire.MAX_SEQS, why=": a message between ranks carries at most that "
                                                                 "many sequences"), default=16, help="concurrent sequences (KV-cache rows per stage)")
    ap.add_argument("--max-context", type=at_least(1), default=None, help="tokens per sequence (default: the model's)")
    ap.add_argument("--queue-size", type=at_least(1), default=64, help="requests that may wait for a slot before 503")
    ap.add_argument("--max-batch-tokens", type=at_least(1), default=256,
                    help="tokens per micro-batch (prompt chunking)")
    ap.add_argument("--microbatches", type=at_least(1), default=None,
                    help="micro-batches in the ring at once (default: one per distinct host, so every board "
                         "works at once; ranks sharing a host's cores do better with fewer, larger batches)")
    ap.add_argument("--step-timeout", type=at_least(0.5, float), default=8.0,
                    help="seconds without an answer from the ring before a rank is declared dead or hung (a "
                         "rank busy with a long step still answers: a slow board is not a dead one)")
    ap.add_argument("--compute-timeout", type=at_least(1.0, float), default=600.0,
                    help="seconds one rank may compute one step before the job is declared stuck (a slow board "
                         "computing a long prompt chunk needs this much; see also --max-batch-tokens)")
    ap.add_argument("--load-silence", type=at_least(2.0, float), default=60.0,
                    help="seconds a rank may send no sign of life while the ranks load their shards before the "
                         "start is ended, naming it (it died: out of memory?); a slow board still sends them")
    ap.add_argument("--shutdown-grace", type=at_least(0.0, float), default=0.0,
                    help="on SIGTERM/SIGINT, seconds in-flight requests may still run (default 0: they get an "
                         "error at once; mpirun kills every rank ~0.25 s after it is signalled)")
    ap.add_argument("--pid-file", default=os.environ.get("SHARDLINE_PID_FILE"),
                    help="rank 0 writes its PID here (the supervisor signals rank 0 for a clean stop)")
    ap.add_argument("--threads", type=at_least(1), default=None,
                    help="torch threads per rank (default: all the host's cores; the host's cores / its ranks where "
                         "ranks sharing it may compute at once: several hosts or --microbatches above 1)")
    ap.add_argument("--api-key", default=os.environ.get("SHARDLINE_API_KEY"),
                    help="require Authorization: Bearer KEY (default: env SHARDLINE_API_KEY, else off)")
    ap.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable)")
    ap.add_argument("--model-name", default=None, help="model id in /v1/models (default: the split's source)")
    ap.add_argument("--verbose", action="store_true", help="print a timing line per pipeline step")
    ap.add_argument("--device", default=os.environ.get("SHARDLINE_DEVICE", "auto"), type=device_name,
                    help="where this rank's stage runs: auto (a CUDA GPU if torch sees one, for float shards; "
                         "else the CPU), cpu, cuda, cuda:N (default auto)")
    ap.add_argument("--wire-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                    help="type of the hidden states sent between ranks (the same on every rank): float16 or "
                         "bfloat16 halve the bytes per hop for slow links at a small cost in accuracy "
                         "(ranks compute in float32 either way; default float32, exact)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as err:
        if err.code in (0, None):
            raise                                          # --help
        # A bad option is a refused start (78): restarting with the same options cannot help.
        from shardline import EX_CONFIG, omp
        if omp.world_rank() == 0:
            pre = argparse.ArgumentParser(add_help=False)
            pre.add_argument("--pid-file", default=os.environ.get("SHARDLINE_PID_FILE"))
            exit_status(pre.parse_known_args(argv)[0].pid_file, EX_CONFIG)
        return EX_CONFIG
    from shardline import EX_CONFIG, omp
    try:
        if omp.world_rank() == 0 and args.pid_file:
            # rank 0's PID while it loads: the supervisor sees at once that it died (the OOM killer on the
            # head) rather than when the workers' --load-silence ends the start, or its --start-timeout
            with open(f"{args.pid_file}.load", "w") as f:
                f.write(f"{os.getpid()}\n")
        # This rank's OpenMP threads (how many, pinned where, spinning or sleeping) are set up before
        # torch loads, since it reads them once: see shardline/omp.py.
        threads = omp.configure(args.model_dir, args.threads, args.microbatches)
        from shardline.node import start
        node = start(args.model_dir, args.slots, args.max_context, threads, args.microbatches,
                     device=args.device, wire_dtype=args.wire_dtype, load_tokenizer=load_tokenizer,
                     load_silence=args.load_silence, on_silent=lambda message: _end_start(args, message))
    except Exception as err:
        # an error no check foresaw (mpi4py prints it and aborts the job): say so with the exit status,
        # or the supervisor, which knows rank 0's PID by now, would take it for a kill (the OOM killer)
        if omp.world_rank() == 0:
            try:
                exit_status(args.pid_file, 1, f"rank 0 failed while starting: {type(err).__name__}: {err}")
            except OSError:
                pass
        raise
    if node is None:
        if omp.world_rank() == 0:
            exit_status(args.pid_file, EX_CONFIG)
        return EX_CONFIG
    code = _serve_head(args, node) if node.rank == 0 else _serve_worker(args, node)
    from shardline.wire import ulfm_on
    if code == 0 and node.ring_closed and node.comm is not None and ulfm_on():
        # A clean end between boards: the SHUTDOWN has gone round the ring and this rank's sends are done
        # (not so, e.g. a SHUTDOWN that did not come home: then MPI_Finalize, as before, pushes out the rest).
        # Open MPI 5.0.11's MPI_Finalize under ULFM (wire.TCP_MCA: mpi_ft_enable with the TCP progress
        # thread) shrinks the world first, and that crashed or hung in 7 of 14 clean stops of 3 ranks over
        # TCP on one host (3 of 8 on a quiet machine): a segfault in the progress thread, "OPAL ERROR: Out
        # of resource in file .../ompi_mpi_finalize.c", or a rank that never exited. Leave without it:
        # under --enable-recovery, which every launcher here pairs with ULFM, Open MPI 5.0.11's mpirun
        # ended with status 0 and said nothing (without it, mpirun calls such an exit improper). ulfm_on
        # asks the MPI library itself, so the setting counts wherever it was made (--mca, a parameter file).
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):    # a broken pipe: mpirun gone already
                pass
        os._exit(0)
    return code


def _end_start(args, message: str) -> None:
    """A rank went silent while the ranks loaded (node.LoadWatch): say so and end the whole job, which
    cannot start without it (status 1: the supervisor starts it again, as after a board lost later)."""
    from mpi4py import MPI

    from shardline import omp
    rank = omp.world_rank()
    say(f"shardline: rank {rank} on {socket.gethostname()}: {message}: ending the job", file=sys.stderr)
    if rank:
        # rank 0 is gone: the workers just exit, and mpirun with them. Each calling MPI_Abort at once is
        # what makes Open MPI 5's exit hang now and then (the job outlived a 60 s wait in a test run).
        os._exit(1)
    exit_status(args.pid_file, 1, message)
    give_up = threading.Timer(5.0, os._exit, (1,))   # MPI_Abort waits for mpirun, which may wait on a lost board
    give_up.daemon = True
    give_up.start()
    MPI.COMM_WORLD.Abort(1)
    os._exit(1)


def _serve_worker(args, node) -> int:
    rank = node.rank
    from mpi4py.MPI import Exception as MPIError

    from shardline import worker
    deadline = [None]

    def on_signal(signum, _frame):
        # mpirun signals every rank at once; wait (bounded) for rank 0's SHUTDOWN to pass through.
        deadline[0] = deadline[0] or (time.monotonic() + 8.0, signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node.ring_closed = worker.serve(
            node.stage, node.link, rank, rank == node.size - 1,
            should_stop=lambda: deadline[0] is not None and time.monotonic() > deadline[0][0],
            silence_timeout=silence(args.step_timeout), heartbeat=heartbeat(args.step_timeout))
    except worker.Silence as err:
        print(f"[rank {rank} on {socket.gethostname()}] {err}: the job is broken, exiting", file=sys.stderr, flush=True)
        os._exit(1)
    except MPIError as err:
        # A neighbour's process ended (ULFM: wire.TCP_MCA). No MPI_Abort, which would end rank 0 before it
        # has answered its clients. Nor an exit at once, unless rank 0 is the one gone: over TCP that exit
        # is a failure of its own, which rank 0 would report instead of the rank really gone (they spread
        # along the ring). Rank 0 names that one and ends the job (MPI_Abort); this wait is bounded.
        import traceback

        from shardline.wire import failed_ranks
        gone = failed_ranks(node.comm)
        print(f"[rank {rank} on {socket.gethostname()}] {'rank ' + ', '.join(map(str, gone)) + ' died' if gone else err}"
              ": the job is broken", file=sys.stderr, flush=True)
        if not gone:
            traceback.print_exc()        # not a failed process: a bug, or an MPI error of another kind
        if 0 not in gone:
            time.sleep(silence(args.step_timeout) + 10)
        os._exit(1)
    except Exception as err:
        print(f"[rank {rank} on {socket.gethostname()}] {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    if deadline[0] is not None and time.monotonic() > deadline[0][0]:
        os._exit(128 + deadline[0][1])   # rank 0 never shut the ring down: an abnormal end
    return 0


def _serve_head(args, node) -> int:
    stage, manifest, tok_dir, link, records = node.stage, node.manifest, node.tok_dir, node.link, node.records
    from shardline.engine import Engine
    size = manifest.num_stages
    hosts = [r["host"] for r in records]
    # One tokenizer for the engine (detokenizing) and the HTTP thread (encoding, chat templates): 12 MiB
    # less than two (see load_tokenizer for why sharing it is safe).
    tokenizer = node.tokenizer    # loaded before the shard (see node.load_stage)
    engine = Engine(stage, tokenizer, link, size, hosts, args.slots,
                    queue_size=args.queue_size, max_batch_tokens=args.max_batch_tokens,
                    step_timeout=args.step_timeout, compute_timeout=args.compute_timeout,
                    log_steps=args.verbose, stats_interval=heartbeat(args.step_timeout),
                    microbatches=args.microbatches or len(set(hosts)), stop_ids=stop_ids(tok_dir),
                    wire_dtype=args.wire_dtype, vocab_size=getattr(manifest.config, "vocab_size", None))
    # From here until engine.run() the engine's Keepalive PINGs the workers: the HTTP stack's imports
    # and the port hand-off take seconds on a busy head board, longer than a short --step-timeout's silence.
    import uvicorn

    from shardline.api import create_app
    data = manifest.data
    name = args.model_name or os.path.basename(str(data["source"]).rstrip("/")) or "model"
    info = {"model": name, "random_weights": data.get("random_weights", False), "ranks": size,
            "slots": args.slots, "max_context": stage.max_context, "wire_dtype": args.wire_dtype,
            "family": manifest.family, "quantization": data.get("quantization"),
            "stages": [{"rank": r["rank"], "host": r["host"], "layers": r["layers"], "rss_mb": r.get("rss_mb"),
                        "load_seconds": r.get("load_seconds"), "device": r.get("device", "cpu"),
                        "fp32_matmul": r.get("fp32_matmul"), "idle_policy": r.get("idle_policy")} for r in records]}
    app = create_app(engine, tokenizer, info, name, api_key=args.api_key,
                     cors_origins=args.cors_origin)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=2,
                                           # longer than clients' pooled-connection reuse (httpx: 5 s), so a
                                           # request never lands on a connection the server is closing
                                           timeout_keep_alive=30))
    # Under the supervisor, which answers 503 on the port while the job starts, ask it for the port
    # (the wait is bounded: a port another program holds is a refused start).
    sock = api_socket(args.host, args.port, handoff=f"{args.pid_file}.bind" if args.pid_file else None,
                      wait=max(1.0, silence(args.step_timeout) - 4.0))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    if sock is not None:
        http.start()

    import queue

    from shardline import LOST_BOARD_SIGNAL
    from shardline.engine import RESTART

    lost_board = []
    signals = queue.SimpleQueue()

    def say_why(reason: str) -> None:
        """The lost board's reason for the supervisor (".why"), at once: a long step of rank 0's own may
        outlast its wait for rank 0's exit. Again once the engine names the board; rank 0's own failure,
        if it came first, stands."""
        if args.pid_file:
            try:
                write_why(args.pid_file, (engine.failed or reason).removesuffix(RESTART))
            except OSError:
                pass

    def on_signal(signum, _frame):
        # Only handed on: a handler runs in the main thread between two of its bytecodes, and one that
        # took a lock the interrupted code holds (a threading.Event's, in the loop's wait for work) would
        # hang rank 0 for good. SimpleQueue.put is reentrant, made for this.
        signals.put(signum)

    engine.on_named = say_why      # (only a lost-board stop names a board)

    def act_on_signals():
        while True:
            signum = signals.get()
            if signum == LOST_BOARD_SIGNAL:
                lost_board.append(signum)
                say_why(LOST_BOARD)
                engine.stop(grace=0, reason=LOST_BOARD, ring_gone=True)
                say("shardline: mpirun has ended the job under rank 0 (it lost a board): stopping")
            else:
                engine.stop(grace=args.shutdown_grace)
                say(f"shardline: signal {signum}: stopping every rank")
    threading.Thread(target=act_on_signals, name="signals", daemon=True).start()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(LOST_BOARD_SIGNAL, on_signal)

    for _ in range(100 if sock is not None else 0):
        if server.started or not http.is_alive():
            break
        time.sleep(0.05)
    refused = not server.started
    if refused:
        # Another program has the port: a refused start (78), which restarting cannot mend.
        print(f"shardline: the API could not listen on {args.host}:{args.port}: stop what uses that port, or "
              "pick another with --port (Ansible: shardline_api_port)", file=sys.stderr, flush=True)
        engine.stop(grace=0)
    else:
        _banner(args, info, records)
        if args.pid_file:
            if args.shutdown_grace:
                # the supervisor waits --stop-timeout for a stop: this much longer, for the grace
                with open(f"{args.pid_file}.grace", "w") as f:
                    f.write(f"{args.shutdown_grace:g}\n")
            with open(args.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
    try:
        code = engine.run()
    except BaseException as err:  # noqa: BLE001 - a bug: never let it end rank 0 before the clients hear
        say_traceback()
        engine.failed = engine.failed or f"rank 0's engine failed: {type(err).__name__}: {err}"
        try:
            engine._fail_all(engine.failed)
        except Exception:  # noqa: BLE001 - what could be told is told; the exit follows
            say_traceback()
        code = 1
    node.ring_closed = engine.ring_closed
    if refused and not code:
        from shardline import EX_CONFIG
        code = EX_CONFIG
    if code and not refused:
        say(f"shardline: {engine.failed}", file=sys.stderr)
        time.sleep(0.5)  # let the error responses reach the waiting clients
    server.should_exit = True
    if http.is_alive():
        http.join(timeout=3)
    if lost_board:
        # mpirun is gone, and with it the job: MPI_Finalize or mpi4py's MPI_Abort for a non-zero status
        # would wait on it. The clients have their answers; say why for the supervisor's log and its 503s
        # (the board's name, or rank 0's own timeout when that came first), and exit at once, non-zero.
        try:
            say_why(engine.stop_reason)
            exit_status(args.pid_file, 1)
        finally:
            os._exit(1)
    exit_status(args.pid_file, code, (engine.failed or "").removesuffix(RESTART) if code and not refused else None)
    if code and link is not None:
        # A hung rank would block a clean exit: end the job for the supervisor. MPI_Abort waits for mpirun,
        # which may wait for the daemon of a board that vanished: exit regardless after a few seconds
        # (the supervisor then ends what is left of the job).
        give_up = threading.Timer(5.0, os._exit, (code,))
        give_up.daemon = True
        give_up.start()
        link.lock.acquire(timeout=1.0)      # no Keepalive in an MPI call meanwhile (serialized)
        link.comm.Abort(code)
    return code


def exit_status(pid_file: str | None, code: int, why: str | None = None) -> None:
    """Tell the supervisor rank 0's exit status (in its PID file's name + ".exit") before the MPI exit:
    MPI_Abort and MPI_Finalize can hang in mpirun (Open MPI 5 does, now and then, when every rank aborts
    at once), and then the supervisor ends the job and still reports this status (78: not restarted).
    why: what failed, in ".why" (written first), which the supervisor's log and its 503s while the job
    restarts repeat, so a client hears why the model is down, not only that it is."""
    if pid_file:
        if why:
            write_why(pid_file, why)
        with open(f"{pid_file}.exit", "w") as f:
            f.write(f"{code}\n")


def write_why(pid_file: str, why: str) -> None:
    """pid_file + ".why", whole or not at all (a new file renamed over it): the supervisor may read it
    at any moment once mpirun has ended."""
    with open(f"{pid_file}.why.new", "w") as f:
        f.write(f"{why}\n")
    os.replace(f"{pid_file}.why.new", f"{pid_file}.why")


def api_socket(host: str, port: int, handoff: str | None = None, wait: float = 15.0):
    """The API's bound socket for uvicorn, or None when the port stays taken. handoff: a file whose
    existence asks the supervisor to let go of the port (it answers 503 there while the job starts);
    the bind is retried meanwhile, so clients see at most a moment with the port closed."""
    from shardline import bound_socket
    if handoff:
        with open(handoff, "w") as f:
            f.write(f"{os.getpid()}\n")
    sock, err = bound_socket(host, port, wait if handoff else 0.0)
    if sock is None:
        say(f"shardline: cannot listen on {host}:{port}: {err}", file=sys.stderr)
    return sock


def load_tokenizer(tok_dir):
    """The split's tokenizer, from its tokenizer/ folder. That folder holds no config.json, on purpose:
    given a model's folder, AutoTokenizer resolves the model's config class, and importing it pulls in
    transformers' model-loading stack (torch.distributed, sympy, accelerate, torch._dynamo: 930
    modules, +116 MiB of RSS on rank 0, measured with transformers 5.23). tests/test_memory.py checks."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    # The engine and the HTTP thread share it. Encoding mutates the Rust tokenizer only to drop a
    # truncation or padding that a tokenizer.json may carry (the API never asks for either), and a
    # mutation while another thread is inside it fails ("Already borrowed"): drop them once, here.
    # The context limit is the engine's (--max-context, the model's own): a longer prompt gets a 400 there.
    # transformers' own check of tokenizer_config.json's model_max_length only logged "Token indices
    # sequence length is longer than the specified maximum ... will result in indexing errors", which
    # nothing here would do.
    tok.model_max_length = int(1e30)
    backend = tok.backend_tokenizer
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    return tok


def stop_ids(tok_dir) -> set[int]:
    """Token ids that end generation besides the tokenizer's EOS: generation_config.json's eos_token_id
    (an int or a list: a chat model's end-of-turn tokens), which the splitter writes beside the tokenizer."""
    from pathlib import Path
    if not (Path(tok_dir) / "generation_config.json").is_file():
        return set()
    from transformers import GenerationConfig
    eos = GenerationConfig.from_pretrained(tok_dir).eos_token_id
    return set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}


def _banner(args, info, records) -> None:
    print(f"shardline: {info['model']} on {info['ranks']} rank(s), API at http://{args.host}:{args.port}", flush=True)
    for r in records:
        a, b = r["layers"]
        print(f"  rank {r['rank']} on {r['host']}: {f'layers {a}..{b - 1}' if b > a else 'no layers'}"
              f"{' + embeddings/head' if r['rank'] == 0 else ''}, {r.get('shard_mb')} MiB shard, "
              f"RSS {r.get('rss_mb')} MiB, loaded in {r.get('load_seconds')}s", flush=True)
    if info["random_weights"]:
        print("shardline: WARNING: RANDOM WEIGHTS (no model hub here): the generated text is meaningless; "
              "it exercises the whole pipeline all the same", flush=True)


if __name__ == "__main__":
    sys.exit(main())
