"""`loader_bound_hint`: when a run says its loader held it back, and what it says."""

from __future__ import annotations

from kiln.training.loop import LOADER_BOUND_SHARE, loader_bound_hint


def test_a_run_waiting_a_fifth_of_its_steps_for_batches_is_told_how_to_feed_it() -> None:
    # the first step waits for the workers to start: it does not count
    hint = loader_bound_hint([5.0, 0.3, 0.3, 0.3], [6.0, 1.0, 1.0, 1.0], in_rank=False)
    assert hint is not None and "waited for its batches 30% of its step time" in hint
    assert "data.num_workers" in hint and "data.fast_decode: true" in hint
    at = LOADER_BOUND_SHARE
    assert loader_bound_hint([0.0, at, at], [1.0, 1.0, 1.0], in_rank=False) is not None


def test_no_hint_below_the_share_over_few_steps_or_with_the_loader_in_the_rank() -> None:
    below = LOADER_BOUND_SHARE - 0.01
    assert loader_bound_hint([5.0, below, below], [6.0, 1.0, 1.0], in_rank=False) is None
    assert loader_bound_hint([0.9, 0.9], [1.0, 1.0], in_rank=False) is None
    # in the rank's process the wait is the loading itself, on cores the ranks fill
    assert loader_bound_hint([0.0, 0.9, 0.9], [1.0, 1.0, 1.0], in_rank=True) is None
    assert loader_bound_hint([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], in_rank=False) is None
