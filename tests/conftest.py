import fcntl
import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model, split

# Under pytest-xdist (./test.sh runs one worker per CPU) a module's tests stay on one worker, so that its
# module fixtures (a server, a bench run, a set of test hosts) are made once, as in a plain run. The
# modules that make test hosts share one unit of work: only one set of them can exist at a time.
TEST_HOST_MODULES = {"test_cluster", "test_boards"}
# Order of the units. Tests marked `alone` stop the other worker, and each run of them first waits for
# the other worker's test in progress, which can last two minutes (a bench run, an Ansible setup). So the
# units made mostly of `alone` tests start first, side by side, and wait only for each other; then the
# longest units, so that no worker is left with a long one at the end.
FIRST = ["test_failures", "test_supervise", "test_omp", "test_idle",
         "test-hosts", "test_bench", "test_gguf", "test_families", "test_ansible"]
# Units whose `alone` tests run before their others, as one run (their tests do not depend on order).
ALONE_FIRST = {"test_failures"}


def _unit(nodeid: str) -> str:
    stem = Path(nodeid.split("::")[0]).stem
    return "test-hosts" if stem in TEST_HOST_MODULES else stem


def _alone(item) -> bool:
    return item.get_closest_marker("alone") is not None


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(FIRST)}

    def key(item):
        unit = _unit(item.nodeid)
        return rank.get(unit, len(FIRST)), unit in ALONE_FIRST and not _alone(item)
    items.sort(key=key)   # stable: a module's tests otherwise keep their order


def pytest_xdist_make_scheduler(config, log):
    """xdist's loadscope scheduling with a module (or the test hosts' modules together) as the unit, in
    collection order. Written here because --dist loadgroup's xdist_group marks do not reach xdist
    3.8.0's scheduler under pytest 9 (it renames item._nodeid, which pytest 9's nodeid no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

        def schedule(self) -> None:
            self.config.option.loadscopereorder = False   # keep FIRST's order, not the most tests first
            super().schedule()

    return ByModule(config, log)


class _Alone:
    """A readers-writer lock shared by the xdist workers of one run (flock on two files): a test marked
    `alone` takes it exclusively, every other test shared, so nothing else runs while a test that times
    something or measures CPU use runs. The turnstile keeps a waiting `alone` test from being starved
    by the other workers' stream of shared holders."""

    def __init__(self, run_id: str):
        base = Path(tempfile.gettempdir()) / f"shardline-tests-{run_id}"
        self.turnstile = open(f"{base}.turnstile", "a")
        self.rw = open(f"{base}.rw", "a")
        self.held: bool | None = None      # None, or whether it is held exclusively

    def hold(self, alone: bool):
        if self.held == alone:
            return
        self.release()
        fcntl.flock(self.turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.rw, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
            self.held = alone
        finally:
            fcntl.flock(self.turnstile, fcntl.LOCK_UN)

    def release(self):
        if self.held is not None:
            fcntl.flock(self.rw, fcntl.LOCK_UN)
            self.held = None


_ALONE = _Alone(os.environ["PYTEST_XDIST_TESTRUNUID"]) if "PYTEST_XDIST_TESTRUNUID" in os.environ else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # Around setup, call and teardown: the module fixtures a test starts or ends are inside the lock too.
    # An `alone` test followed by another keeps the lock for it: otherwise each would wait again for
    # whatever test the other worker started in between.
    if _ALONE is None:
        return (yield)
    _ALONE.hold(_alone(item))
    try:
        return (yield)
    finally:
        if not (_alone(item) and nextitem is not None and _alone(nextitem)):
            _ALONE.release()


def pytest_unconfigure(config):
    # Each worker opened both files at start; the lock lives on in their open files until the last one ends.
    if _ALONE is not None:
        for f in (_ALONE.turnstile, _ALONE.rw):
            Path(f.name).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A local save_pretrained directory (model + tokenizer) of a small GPT-2 with sharp logits."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def parts3(tiny_model_dir, tmp_path_factory):
    """The tiny model split into 3 stages by the automatic plan."""
    return split(tiny_model_dir, 3, tmp_path_factory.mktemp("parts3"))

