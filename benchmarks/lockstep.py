"""Two jobs timed in lockstep, so that a shared machine's slowdowns hit both alike.

On a busy or noisy machine, two runs timed one after the other differ by up to ±10% from load
alone (their CPU time moves with their wall time: it is the machine, not the code). `lockstep`
runs both jobs at once, each in its own process with its own copy of the model, and makes them
take turns: a job runs from one of its model forwards to its next one (the forward plus the
engine's work around it, ~0.1 s here) while the other waits. Each job's clock counts only its
own turns, so a slow minute of the machine is shared between the two instead of landing on one.

Processes, not threads: torch ran the same decode step ~30% slower in a second Python thread
than in a process's main thread here, which would have skewed every turn.
"""
from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Callable
from typing import Any

from torch import nn

# job(attach): loads its model (untimed), calls attach(model) to wait for its first turn, then runs (timed)
Job = Callable[[Callable[[nn.Module], None]], Any]


class _Turns:
    """One job's side of the turn-taking: its clock, and the semaphores that pass the turn."""

    def __init__(self, mine, theirs, their_done, my_done) -> None:
        self.mine, self.theirs, self.their_done, self.my_done = mine, theirs, their_done, my_done
        self.seconds, self.turns = 0.0, 0
        self.started = 0.0

    def begin(self) -> None:
        """Wait for the first turn, then start the clock."""
        self.mine.acquire()
        self.started = time.perf_counter()

    def pass_turn(self) -> None:
        """Stop the clock, let the other job run one turn (unless it is done), restart the clock."""
        self.seconds += time.perf_counter() - self.started
        self.turns += 1
        if not self.their_done.is_set():
            self.theirs.release()
            self.mine.acquire()
        self.started = time.perf_counter()

    def finish(self) -> None:
        """Stop the clock for good and hand the other job every turn from now on."""
        self.seconds += time.perf_counter() - self.started
        self.my_done.set()
        self.theirs.release()


def _child(job: Job, turns: _Turns, results) -> None:
    def attach(model: nn.Module) -> None:
        model.register_forward_pre_hook(lambda module, args, kwargs: turns.pass_turn(), with_kwargs=True)
        turns.begin()  # the clock starts once the job is set up and has the turn

    outcome: Any = None
    error = None
    try:
        outcome = job(attach)
    except Exception as failure:  # reported to the parent, which raises
        error = repr(failure)
    finally:
        turns.finish()
    results.put((turns.seconds, turns.turns, outcome, error))


def _outcome(results, process, name: str) -> tuple:
    """The child's report; an error if it died without one (killed, or crashed in C)."""
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            if not process.is_alive() and results.empty():
                raise RuntimeError(f"lockstep job {name!r} died (exit code {process.exitcode})") from None


def lockstep(jobs: dict[str, Job]) -> dict[str, dict[str, Any]]:
    """Run two jobs in lockstep (the first listed moves first); returns, per job, the seconds of its own
    turns, its number of turns (forwards) and its result."""
    if len(jobs) != 2:
        raise ValueError("lockstep runs exactly two jobs")
    context = multiprocessing.get_context("spawn")  # a forked torch (OpenMP) child can hang
    names = list(jobs)
    semaphores = {name: context.Semaphore(0) for name in names}
    done = {name: context.Event() for name in names}
    queues = {name: context.Queue() for name in names}
    processes = []
    for name, other in zip(names, reversed(names)):
        turns = _Turns(semaphores[name], semaphores[other], done[other], done[name])
        processes.append(context.Process(target=_child, args=(jobs[name], turns, queues[name])))
    for process in processes:
        process.start()
    semaphores[names[0]].release()
    try:
        outcomes = {name: _outcome(queues[name], process, name) for name, process in zip(names, processes)}
    except BaseException:
        for process in processes:  # a job that died leaves the other waiting for its turn forever
            process.terminate()
        raise
    for process in processes:
        process.join()
    report = {}
    for name, (seconds, turns, outcome, error) in outcomes.items():
        if error is not None:
            raise RuntimeError(f"lockstep job {name!r} failed: {error}")
        report[name] = {"seconds": seconds, "turns": turns, "result": outcome}
    return report
