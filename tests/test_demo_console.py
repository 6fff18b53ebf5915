"""`ppcl demo`'s console: one line per stage with its time; kfp.local's executor output goes to the log file."""

from __future__ import annotations

import io

import pytest


def test_stage_console_prints_one_line_per_task_and_logs_everything():
    from ppcl_kfp.cli.demo import StageConsole

    now = iter([0.0, 2.5, 3.0, 4.25, 10.0, 11.0]).__next__
    log, out = io.StringIO(), io.StringIO()
    console = StageConsole(log, out, {"export": ["keep 0.8"]}, clock=now)
    kfp_output = (
        "21:00:00.000 - INFO - Executing task \x1b[96m'shard'\x1b[0m\n"
        "21:00:00.001 - INFO - Streamed logs:\n\n"
        '    {"executor_input": {"inputs": {"parameterValues": {"settings": {}}}}}\n'
        "    probe: 3/8 forwards (38%), 2.00 s/forward, ETA 10s\n"
        "21:00:02.500 - INFO - Task \x1b[96m'shard'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n"
        "21:00:03.000 - INFO - Executing task 'export'\n"
        "21:00:04.250 - INFO - Task 'export' finished with status SUCCESS\n"
        "21:00:10.000 - INFO - Executing task 'evaluate'\n"
        "21:00:11.000 - ERROR - Task 'evaluate' finished with status FAILURE\n"
    )
    for k in range(0, len(kfp_output), 7):  # arbitrary write boundaries, as a stream delivers them
        console.write(kfp_output[k:k + 7])
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["[demo]", "shard", "done", "2.5", "s"]
    assert lines[1].split() == ["[demo]", "export", "(keep", "0.8)", "done", "1.2", "s"]
    assert lines[2].split() == ["[demo]", "evaluate", "FAILURE", "1.0", "s"]
    assert console.failed == ["evaluate"]
    assert log.getvalue() == kfp_output  # nothing lost from the log, executor JSON included
    assert "executor_input" not in out.getvalue()
    assert not console.isatty()  # progress below writes plain lines, not bar frames


def test_demo_arch_with_a_config_teacher_is_refused(tmp_path):
    from ppcl.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"version: 1\nteacher: {tmp_path / 'some-teacher'}\n")
    assert main(["demo", "--arch", "sd3", "--config", str(cfg), "--run-root", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_demo_arch_help_says_random():
    from ppcl.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["demo"]
    text = " ".join(sub.format_help().split())
    assert "RANDOM" in text and "reference teacher" in text


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
