"""Stands in for an mpirun that would start ranks on a board elsewhere, for the supervisor's tests on a
machine without the test hosts (no root): `stand_in_launcher.py --hostfile F --mca plm_rsh_agent A --
COMMAND...` declares the boards (what the supervisor checks over SSH before a start, as it reads them
from launch.sh's mpirun) and runs COMMAND, the real job on this machine's ranks, in its place."""
import os
import sys

if __name__ == "__main__":
    if "--" not in sys.argv:
        sys.exit("usage: stand_in_launcher.py [mpirun options] -- COMMAND...")
    command = sys.argv[sys.argv.index("--") + 1:]
    os.execvp(command[0], command)
