"""Progress: plain lines off a terminal, a live rich view when asked."""

from __future__ import annotations

import io

from pipelines.progress import PipelineProgress


def test_not_a_tty_prints_one_line_per_stage() -> None:
    stream = io.StringIO()
    with PipelineProgress(stream=stream) as progress:
        assert progress.live is False
        progress.start_stage("retrain", total=3, cached=1)
        progress.advance("retrain")
        progress.advance("retrain")
        progress.end_stage("retrain", executed=2, skipped=1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("[retrain] 3 units: 2 executed, 1 cached")


def test_live_view_shows_done_over_total() -> None:
    stream = io.StringIO()
    with PipelineProgress(live=True, stream=stream) as progress:
        progress.start_stage("cost", total=4, cached=0)
        for _ in range(4):
            progress.advance("cost")
        progress.end_stage("cost", executed=4, skipped=0)
    text = stream.getvalue()
    assert "cost" in text and "4/4" in text
