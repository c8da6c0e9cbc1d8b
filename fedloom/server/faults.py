"""Crash injection for the coordinator's fault-tolerance tests (never set in production).

``FEDLOOM_CRASH=<point>:<round>`` makes ``fedloom server`` kill itself with
SIGKILL (no cleanup, no flush, like ``kill -9``) at one point of round ``round``:

- ``mid-round``: when the first fit result of the round has arrived, before it is folded;
- ``after-checkpoint``: right after the round's run state was written, before the
  round's metrics line and model file;
- ``in-checkpoint``: inside the atomic write of the round's run state, after half of
  the temporary file is on disk and before the rename.

The hooks wrap ``fedloom.server.runstate.save``/``atomic_write`` and the fleet's
``run``; nothing changes when the variable is unset.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from fedloom.server import runstate

ENV = "FEDLOOM_CRASH"
POINTS = ("mid-round", "after-checkpoint", "in-checkpoint")


def parse(spec: str) -> tuple[str, int]:
    point, _, rnd = spec.partition(":")
    if point not in POINTS or not rnd.isdigit():
        raise ValueError(f"{ENV}={spec!r}: expected <point>:<round> with point one of {', '.join(POINTS)}")
    return point, int(rnd)


def die(where: str) -> None:
    sys.stderr.write(f"fault injection: SIGKILL {where}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(fleet, spec: str | None = None):
    """Arm the crash named by ``spec`` (default: the environment); returns the fleet to drive."""
    spec = os.environ.get(ENV) if spec is None else spec
    if not spec:
        return fleet
    point, rnd = parse(spec)
    if point == "mid-round":
        return _MidRound(fleet, rnd)
    save, atomic_write = runstate.save, runstate.atomic_write
    armed = {"write": False}

    def crash_save(run_dir, state):
        armed["write"] = point == "in-checkpoint" and state.round == rnd
        path = save(run_dir, state)
        if point == "after-checkpoint" and state.round == rnd:
            die(f"after the checkpoint of round {rnd}")
        return path

    def crash_write(path: Path, write) -> None:
        if not armed["write"]:
            return atomic_write(path, write)
        tmp = path.with_name(f".{path.name}.crash")
        write(str(tmp))
        os.truncate(tmp, tmp.stat().st_size // 2)  # a torn write: half the file, never renamed
        die(f"inside the checkpoint write of round {rnd}")

    runstate.save, runstate.atomic_write = crash_save, crash_write
    return fleet


class _MidRound:
    """A fleet that dies when the first fit outcome of round ``rnd`` arrives."""

    def __init__(self, fleet, rnd: int):
        self._fleet, self._round = fleet, rnd

    def __getattr__(self, name: str):
        return getattr(self._fleet, name)

    def run(self, instruction, node_ids, *, timeout: float, **options) -> Iterator:
        for outcome in self._fleet.run(instruction, node_ids, timeout=timeout, **options):
            if instruction.kind == "fit" and instruction.round == self._round:
                die(f"in round {self._round} with a result in hand")
            yield outcome
