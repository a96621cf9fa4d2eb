"""The lockstep timer behind the steering-overhead benchmark: strict turns, each job's own time only."""
import functools
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.lockstep import lockstep


def _job(name: str, forwards: int, pause: float, log: str, attach) -> int:
    """A stand-in job: `forwards` forwards of a tiny module, each noting its name in `log`, then pausing."""
    model = nn.Linear(2, 2)
    attach(model)
    for _ in range(forwards):
        model(torch.zeros(1, 2))
        with open(log, "a") as file:
            file.write(name)
        time.sleep(pause)
    return forwards


def test_jobs_alternate_forward_by_forward_and_keep_their_own_time(tmp_path: Path):
    log = tmp_path / "order.txt"
    jobs = {"a": functools.partial(_job, "a", 3, 0.2, str(log)),
            "b": functools.partial(_job, "b", 5, 0.0, str(log))}
    report = lockstep(jobs)
    assert log.read_text() == "ababab" + "bb"  # strict turns; b goes on alone once a is done
    assert [report[name]["result"] for name in "ab"] == [3, 5]
    assert [report[name]["turns"] for name in "ab"] == [3, 5]
    assert report["a"]["seconds"] >= 0.6  # its three pauses
    assert report["b"]["seconds"] < 0.4  # none of a's pauses landed on b's clock


def test_a_failing_job_is_reported_and_does_not_hang_the_other(tmp_path: Path):
    jobs = {"a": functools.partial(_job, "a", 2, 0.0, str(tmp_path / "order.txt")),
            "b": functools.partial(_job, "b", "two", 0.0, str(tmp_path / "order.txt"))}
    with pytest.raises(RuntimeError, match="lockstep job 'b' failed"):
        lockstep(jobs)
