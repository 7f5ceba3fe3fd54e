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
# The longest units start first, so that no worker is left with a long one at the end.
FIRST = ["test-hosts", "test_failures", "test_bench", "test_gguf", "test_families", "test_ansible"]


def _unit(nodeid: str) -> str:
    stem = Path(nodeid.split("::")[0]).stem
    return "test-hosts" if stem in TEST_HOST_MODULES else stem


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(FIRST)))   # stable


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

    def hold(self, alone: bool):
        fcntl.flock(self.turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.rw, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(self.turnstile, fcntl.LOCK_UN)

    def release(self):
        fcntl.flock(self.rw, fcntl.LOCK_UN)


_ALONE = _Alone(os.environ["PYTEST_XDIST_TESTRUNUID"]) if "PYTEST_XDIST_TESTRUNUID" in os.environ else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # Around setup, call and teardown: the module fixtures a test starts or ends are inside the lock too.
    if _ALONE is None:
        return (yield)
    _ALONE.hold(item.get_closest_marker("alone") is not None)
    try:
        return (yield)
    finally:
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

