"""Progress: quiet plain lines off a terminal (with a heartbeat for long stages), a live rich
view with per-unit training bars and an ETA on a terminal."""

from __future__ import annotations

import io
import threading

from pipelines.progress import PipelineProgress


def test_not_a_tty_prints_one_line_per_stage() -> None:
    stream = io.StringIO()
    with PipelineProgress(stream=stream) as progress:
        assert progress.live is False
        progress.start_stage("retrain", total=3, cached=1)
        progress.unit_report("retrain", "layer1.0", "epoch", {"epoch": 1, "of": 2, "loss": 0.5})
        progress.advance("retrain", unit="layer1.0")
        progress.advance("retrain", unit="layer1.1")
        progress.end_stage("retrain", executed=2, skipped=1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("[retrain] 3 units: 2 executed, 1 cached")


def test_a_long_stage_off_a_terminal_gets_heartbeat_lines_with_loss_and_eta() -> None:
    stream = io.StringIO()
    with PipelineProgress(stream=stream, heartbeat_s=0.0) as progress:
        progress.start_stage("joint", total=1, cached=0)
        progress.unit_report("joint", "resnet20", "step", {"step": 50, "of": 200, "loss": 0.25})
        progress.end_stage("joint", executed=1, skipped=0)
    first, last = stream.getvalue().splitlines()
    assert first.startswith("[joint] 0/1 units, resnet20: step 50/200 loss 0.25,") and "eta " in first
    assert last.startswith("[joint] 1 units: 1 executed")


def test_live_view_shows_done_over_total_unit_bars_and_eta() -> None:
    stream = io.StringIO()
    with PipelineProgress(live=True, stream=stream) as progress:
        progress.start_stage("teacher", total=1, cached=0)
        # Reports arrive from another thread under Ray Train.
        worker = threading.Thread(target=progress.unit_report,
                                  args=("teacher", "resnet20", "epoch", {"epoch": 1, "of": 4, "loss": 1.5}))
        worker.start()
        worker.join()
        assert ("teacher", "resnet20") in progress._unit_tasks
        stage = progress._stages["teacher"]
        assert stage.fraction() == 0.25 and stage.eta(stage.started + 10) == 30
        progress.log(progress._progress.get_renderable())  # what the live display shows now
        text = stream.getvalue()
        assert "epoch 1/4 loss 1.5" in text and "eta 0:" in text
        progress.advance("teacher", unit="resnet20")
        assert not progress._unit_tasks
        progress.end_stage("teacher", executed=1, skipped=0)
        progress.start_stage("cost", total=4, cached=0)
        for _ in range(4):
            progress.advance("cost")
        progress.end_stage("cost", executed=4, skipped=0)
    text = stream.getvalue()
    assert "cost" in text and "4/4" in text
