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
