"""Progress where no terminal shows a live bar: one plain line per finished step, on stderr."""

from __future__ import annotations

from draftkv.progress import progress_bar


def test_a_log_gets_one_line_per_step_with_counts(capsys):
    with progress_bar() as progress:
        task = progress.add_task("ruler", total=3)
        progress.update(task, description="niah_single_1 dense")
        progress.advance(task)
        progress.advance(task, 2)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == ""
    assert [line.split(" | ")[0] for line in lines] == ["1/3 niah_single_1 dense", "3/3 niah_single_1 dense"]
    assert all("eta" in line and "elapsed" in line for line in lines)


def test_the_eta_is_the_mean_pace_so_far_times_the_steps_left(capsys):
    clock = [0.0]
    with progress_bar(get_time=lambda: clock[0]) as progress:
        task = progress.add_task("samples", total=4)
        for now in (300.0, 330.0, 360.0):  # a slow first step, then fast ones
            clock[0] = now
            progress.advance(task)
    lines = capsys.readouterr().err.strip().splitlines()
    # 300 s for 1 of 4 steps leaves 3 x 300 s; then 330 s for 2 leaves 2 x 165 s; 360 s for 3 leaves 120 s.
    assert [line.split(" | ")[2] for line in lines] == ["eta 0:15:00", "eta 0:05:30", "eta 0:02:00"]
    assert [line.split(" | ")[1] for line in lines] == ["elapsed 0:05:00", "elapsed 0:05:30", "elapsed 0:06:00"]


def test_a_long_step_stays_on_one_line(capsys):
    with progress_bar() as progress:
        task = progress.add_task("samples", total=1)
        progress.update(task, description="samples: " + "niah_multikey_3-4096-0-2 " * 6)
        progress.advance(task)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("eta 0:00:00")
