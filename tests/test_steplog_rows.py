"""The step log indexes a harness batch (consecutive rows) by a slice and any other rows by an index array: both
must record what a row-by-row loop records, and a row outside the log must stay an error."""
from __future__ import annotations

import numpy as np
import pytest

from adadiff_bench.steplog import StepLog

NUM_SAMPLES, NUM_STEPS, NUM_BLOCKS = 12, 4, 5


def record_everything(log: StepLog, batch: int) -> None:
    """One of every record, for the whole batch and for some of its rows."""
    some = np.arange(batch)[::2]
    for step in range(NUM_STEPS):
        log.set_step(step)
        log.ran_depth(2 + step % 3)
        log.ran_embed()
        log.ran_embed(some)
        log.ran_block(4, some)
        log.ran_head()
        log.exited(1, some)
        log.add_macs(10.0)
        log.add_macs(np.arange(batch, dtype=float))
        log.add_macs(3.0, some)
        log.ran_prefixes(np.arange(batch) % NUM_BLOCKS)


def by_hand(rows: np.ndarray) -> dict[str, np.ndarray]:
    """The same records, row by row."""
    blocks = np.zeros((NUM_SAMPLES, NUM_STEPS, NUM_BLOCKS), bool)
    exits = np.full((NUM_SAMPLES, NUM_STEPS), -1)
    embeds, heads, macs = (np.zeros((NUM_SAMPLES, NUM_STEPS)) for _ in range(3))
    for step in range(NUM_STEPS):
        depth = 2 + step % 3
        for i, row in enumerate(rows):
            some = i % 2 == 0
            blocks[row, step, :depth] = True
            blocks[row, step, 4] |= some
            blocks[row, step, :i % NUM_BLOCKS] = True
            embeds[row, step] += 2 + some
            heads[row, step] += 2
            exits[row, step] = 1 if some else depth
            macs[row, step] += 10.0 + i + 3.0 * some
    return {"blocks_run": blocks, "exit_point": exits, "embed_calls": embeds, "head_calls": heads, "extra_macs": macs}


@pytest.mark.parametrize("rows", [[4, 5, 6, 7], [0], [3, 1, 2], [2, 4, 6], [11, 0]])
def test_records_match_a_row_by_row_loop(rows):
    log = StepLog(NUM_SAMPLES, np.arange(NUM_STEPS, dtype=float), NUM_BLOCKS)
    log.set_batch(np.array(rows))
    record_everything(log, len(rows))
    for name, expected in by_hand(np.array(rows)).items():
        assert np.array_equal(getattr(log, name), expected), name


def test_a_row_outside_the_log_is_still_an_error():
    log = StepLog(NUM_SAMPLES, np.arange(NUM_STEPS, dtype=float), NUM_BLOCKS)
    log.set_batch(np.arange(10, 14))  # two rows past the end: no slice that would quietly drop them
    with pytest.raises(IndexError):
        log.ran_depth(2)
