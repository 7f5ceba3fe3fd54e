"""shardline: what runs on a board (stage, wire protocol, engine, sampling, API, metrics)."""

import signal

EX_CONFIG = 78  # exit status of a refused start (bad shard, wrong rank count): restarting will not help
# The supervisor sends rank 0 this signal when mpirun ended the job under it (Open MPI lost contact with a
# board's daemon: a board lost power or its cable) without stopping rank 0: its clients hear why.
LOST_BOARD_SIGNAL = signal.SIGUSR1


def say(text: str, file=None) -> None:
    """print, for rank 0 once its job may be ending: when mpirun is gone, rank 0's stdout and stderr are
    broken pipes, and the exception a print raises there (in a signal handler, or in the engine's loop
    as it fails its requests) would end rank 0 before its HTTP thread wrote the clients their errors.
    RuntimeError: a signal handler's say() interrupting the loop's own print (--verbose step lines) on
    the same stream ("reentrant call"), which would turn into a made-up pipeline failure."""
    import sys
    try:
        print(text, file=file or sys.stdout, flush=True)
    except (OSError, RuntimeError):
        pass


def say_traceback() -> None:
    """The exception being handled, on stderr, as say() prints."""
    import sys
    import traceback
    say(traceback.format_exc().rstrip("\n"), file=sys.stderr)


def bound_socket(host: str, port: int, wait: float = 0.0):
    """(a TCP socket bound to host:port for uvicorn to listen on, None) or (None, the OSError) once the
    port is still taken after `wait` seconds (bind retried meanwhile: a process on its way out, or a
    supervisor letting go, may hold it for a moment) or cannot be bound at all. SO_REUSEADDR, as uvicorn
    binds, so connections closing on the port do not count. It listens at once: a client that connects
    before uvicorn has started (its imports, its config) waits in the backlog instead of being refused,
    so a supervisor handing the port to rank 0 shows clients no moment of a closed port."""
    import errno
    import socket
    import time
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(2048)                  # uvicorn's backlog; its own listen() keeps it
            return sock, None
        except OSError as err:
            sock.close()
            if err.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                return None, err
        time.sleep(0.05)
