"""How a waiting rank sleeps (shardline/wire.py idle_sleep): as SCHED_BATCH, so that its wake-ups do not
preempt a rank computing on the same cores, and back to SCHED_OTHER before it computes; a thread a user
started under another policy is left alone; SHARDLINE_IDLE_POLICY=normal turns it off and a bad value
stops a rank at start naming the variable. (What it buys is a benchmark figure: `python -m bench`.)"""
from __future__ import annotations

import os
import subprocess
import threading

import pytest

from shardline import wire
from tests.helpers import PY, ROOT, serving, split

# alone: their checks count a waiting thread's wake-ups and CPU (conftest.py)
pytestmark = [pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no Linux scheduling policies here"),
              pytest.mark.alone]


@pytest.fixture
def policy(monkeypatch):
    def use(name: str | None):
        if name is None:
            monkeypatch.delenv(wire.IDLE_POLICY_ENV, raising=False)
        else:
            monkeypatch.setenv(wire.IDLE_POLICY_ENV, name)
        wire.idle_policy.cache_clear()
        return wire.idle_policy()
    yield use
    wire.idle_policy.cache_clear()


def _policies_in(start_policy: int, since_traffic: float, monkeypatch) -> tuple[int, int]:
    """(the thread's policy while idle_sleep sleeps, its policy afterwards), in a fresh thread that starts
    under start_policy."""
    seen = {}
    real_sleep = wire.time.sleep

    def spy(seconds):
        seen["during"] = os.sched_getscheduler(0)
        real_sleep(seconds)
    monkeypatch.setattr(wire.time, "sleep", spy)

    def body():
        os.sched_setscheduler(0, start_policy, os.sched_param(0))
        wire.idle_sleep(since_traffic)
        seen["after"] = os.sched_getscheduler(0)
    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    return seen["during"], seen["after"]


@pytest.mark.parametrize("since_traffic", [0.0, 1.0])        # the fast and the slow poll
def test_a_waiting_thread_sleeps_as_batch_and_wakes_as_other(policy, monkeypatch, since_traffic):
    assert policy(None) == "batch"
    assert _policies_in(os.SCHED_OTHER, since_traffic, monkeypatch) == (os.SCHED_BATCH, os.SCHED_OTHER)


def test_normal_leaves_the_policy_alone(policy, monkeypatch):
    assert policy("normal") == "normal"
    assert _policies_in(os.SCHED_OTHER, 0.0, monkeypatch) == (os.SCHED_OTHER, os.SCHED_OTHER)


def test_a_thread_started_as_batch_by_its_user_stays_batch(policy, monkeypatch):
    assert policy("batch") == "batch"
    assert _policies_in(os.SCHED_BATCH, 0.0, monkeypatch) == (os.SCHED_BATCH, os.SCHED_BATCH)


def test_a_bad_policy_is_refused_naming_the_variable(policy):
    with pytest.raises(ValueError, match=r"SHARDLINE_IDLE_POLICY='idle': use batch or normal"):
        policy("idle")


def test_a_bad_policy_stops_the_rank_at_start_and_health_names_the_policy(tiny_model_dir, tmp_path, policy):
    parts = split(tiny_model_dir, 1, tmp_path / "parts")
    env = {**os.environ, wire.IDLE_POLICY_ENV: "sleepy"}
    run = subprocess.run([PY, "main.py", "--model-dir", str(parts), "--port", "0"], cwd=ROOT, env=env, check=False,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "SHARDLINE_IDLE_POLICY='sleepy': use batch or normal" in run.stderr, run.stderr
    policy(None)
    with serving(parts, 1, tmp_path) as s:
        import httpx
        stages = httpx.get(s.url + "/health").json()["stages"]
        assert [st["idle_policy"] for st in stages] == ["batch"]


def test_a_sandbox_that_refuses_the_calls_leaves_plain_sleeps(policy, monkeypatch):
    """Where a seccomp profile refuses sched_setscheduler, the waiting loop must still sleep, not fail,
    and stop trying."""
    assert policy("batch") == "batch"
    calls = []

    def refuse(*args):
        calls.append(args)
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(wire, "_policy_calls_fail", False)
    monkeypatch.setattr(wire.os, "sched_setscheduler", refuse)
    slept = []
    monkeypatch.setattr(wire.time, "sleep", slept.append)
    wire.idle_sleep(0.0)
    wire.idle_sleep(1.0)
    assert slept == [0.00005, 0.002] and len(calls) == 1
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
