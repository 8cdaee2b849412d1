"""The training step's own checks and logged means (`kiln.training.loop`), one process."""

from __future__ import annotations

import pytest
import torch

from kiln.training.data import Batch
from kiln.training.loop import _check_batch_rows, _start_global_means


def _batch(rows: int) -> Batch:
    images = torch.zeros(rows, 3, 4, 4, dtype=torch.uint8)
    return Batch(images, None, [str(i) for i in range(rows)])


def test_a_batch_of_other_than_data_batch_size_rows_is_refused_by_name() -> None:
    _check_batch_rows(_batch(4), 4)
    with pytest.raises(RuntimeError, match=r"batch of 3 samples, not data\.batch_size=4"):
        _check_batch_rows(_batch(3), 4)


def test_one_rank_means_average_the_micro_steps() -> None:
    logs = [
        {"loss": torch.tensor(1.0), "scale": torch.tensor([2.0])},
        {"loss": torch.tensor(3.0), "scale": torch.tensor([4.0])},
    ]
    assert _start_global_means(logs, 1)() == {"loss": 2.0, "scale": 3.0}
    assert _start_global_means([{}], 1)() == {}
