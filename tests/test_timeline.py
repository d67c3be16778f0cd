"""bench/timeline.py: the interval arithmetic its GPU summary rests on, and a profiled window of
steps on the CPU (no GPU events: the per-kind step counts and wall times still add up)."""
import time

import pytest
import torch

from bench.timeline import StepWindow, _covered, _union


def test_union_merges_overlaps_and_covered_clips_to_the_window() -> None:
    merged = _union([(5.0, 7.0), (0.0, 2.0), (1.0, 3.0), (7.0, 8.0), (10.0, 11.0)])
    assert merged == [(0.0, 3.0), (5.0, 8.0), (10.0, 11.0)]
    assert _covered(merged, 0.0, 11.0) == 3.0 + 3.0 + 1.0
    assert _covered(merged, 2.0, 6.0) == 1.0 + 1.0
    assert _covered(merged, 3.0, 5.0) == 0.0
    assert _covered(merged, -5.0, 1.0) == 1.0  # from before the first interval
    assert _covered(merged, 7.5, 20.0) == 0.5 + 1.0
    assert _covered([], 0.0, 1.0) == 0.0


def test_a_window_counts_each_kind_of_step() -> None:
    window = StepWindow()
    with window.step():  # not started: not recorded
        pass
    window.start()
    kinds = []
    for i in range(5):
        with window.step():
            torch.ones(64, 64) @ torch.ones(64, 64)
            time.sleep(0.002)
        kinds.append("decode" if i % 2 == 0 else "mixed<=512")
    summary = window.stop(kinds)
    assert summary["steps"] == 5
    by_kind = summary["by_step_kind"]
    assert by_kind["decode"]["steps"] == 3 and by_kind["mixed<=512"]["steps"] == 2
    assert by_kind["decode"]["wall_ms"] >= 3 * 2.0 and by_kind["mixed<=512"]["wall_ms"] >= 2 * 2.0
    assert summary["window_ms"] >= sum(k["wall_ms"] for k in by_kind.values())
    assert summary["between_steps_ms"] >= 0
    window.start()
    with window.step():
        pass
    with pytest.raises(ValueError, match="1 steps profiled but 2 kinds"):
        window.stop(["decode", "decode"])
