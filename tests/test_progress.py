"""Progress output that suits where it goes (ppcl.progress): a bar on a terminal, plain periodic lines in a log,
nothing with --no-progress; every long command has the flag, every stage command --no-tracking."""

from __future__ import annotations

import io

import pytest

from ppcl.progress import PlainProgress, progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_every_interval_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(total=300, desc="distill", unit="step", every=30, stream=out, clock=clock)
    for _ in range(120):  # 0.5 s per step: a line at 30 s and 60 s
        clock.t += 0.5
        bar.update(1)
        bar.set_postfix(loss="0.1234")
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "distill: 60/300 steps (20%), 2.00 steps/s, ETA 2m00s, loss=0.1234"
    assert lines[1] == "distill: 120/300 steps (40%), 2.00 steps/s, ETA 1m30s, loss=0.1234"
    assert lines[2] == "distill: 120/300 steps (40%) in 1m00s, 2.00 steps/s, loss=0.1234"  # the closing line
    assert len(lines) == 3 and "\r" not in out.getvalue()


def test_slow_units_show_seconds_per_unit_and_resume_counts_only_new_work():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(total=10, initial=4, desc="probe", unit="forward", every=5, stream=out, clock=clock)
    clock.t = 6.0
    bar.update(2)
    assert out.getvalue().strip() == "probe: 6/10 forwards (60%), 3.00 s/forward, ETA 12s"


def test_a_short_loop_stays_silent_and_disable_writes_nothing():
    clock, out = Clock(), io.StringIO()
    with PlainProgress(range(5), desc="encode", every=30, stream=out, clock=clock) as bar:
        assert list(bar) == [0, 1, 2, 3, 4]
    assert out.getvalue() == ""
    silent = progress(range(3), desc="x", disable=True, stream=out)
    assert list(silent) == [0, 1, 2] and out.getvalue() == ""


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar_a_log_gets_plain_lines(monkeypatch):
    from tqdm import tqdm

    bar = progress(total=3, desc="t", stream=Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress(total=3, desc="t", stream=io.StringIO()), PlainProgress)
    monkeypatch.setenv("PPCL_PROGRESS_INTERVAL", "7")
    assert progress(total=3, stream=io.StringIO()).every == 7.0
    monkeypatch.setenv("PPCL_PROGRESS_INTERVAL", "soon")  # a log setting never stops a run
    assert progress(total=3, stream=io.StringIO()).every == 30.0


@pytest.mark.parametrize("command", ["synth", "shard", "encode", "probe", "distill", "evaluate"])
def test_every_long_command_has_no_progress(command):
    from ppcl.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    assert "--no-progress" in sub._option_string_actions


@pytest.mark.parametrize("command", ["shard", "encode", "probe", "select", "distill", "export", "evaluate"])
def test_every_stage_command_has_no_tracking(command):
    from ppcl.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    assert "--no-tracking" in sub._option_string_actions
