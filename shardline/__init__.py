"""shardline: what runs on a board (stage, wire protocol, engine, sampling, API, metrics)."""

import signal

EX_CONFIG = 78  # exit status of a refused start (bad shard, wrong rank count): restarting will not help
# The supervisor sends rank 0 this signal when mpirun ended the job under it (Open MPI lost contact with a
# board's daemon: a board lost power or its cable) without stopping rank 0: its clients hear why.
LOST_BOARD_SIGNAL = signal.SIGUSR1
