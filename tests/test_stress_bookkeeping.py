"""The stress harness counts lost and duplicated messages by id: its id set must be exact."""

from __future__ import annotations

import random

from stress.workload import HOP_STRIDE, IdSet, Tracker


def test_id_set_holds_exactly_what_was_added() -> None:
    rng = random.Random(7)
    ids = {rng.randrange(5000) * HOP_STRIDE + rng.randrange(300) for _ in range(20000)}
    id_set = IdSet()
    id_set.update(ids)
    assert len(id_set) == len(ids)
    assert set(id_set) == ids
    assert all(mid in id_set for mid in ids)
    assert 4999 * HOP_STRIDE + 301 not in id_set and 99999 * HOP_STRIDE not in id_set
    assert not id_set.add(next(iter(ids)))  # already there
    half = IdSet()
    half.update(list(ids)[:5000])
    assert id_set - half == ids - set(half)
    assert half - id_set == set()


def test_tracker_counts_lost_duplicated_and_unexpected() -> None:
    tracker = Tracker()
    for hop in range(1, 11):
        tracker.sent(3 * HOP_STRIDE + hop)
    for hop in (1, 2, 2, 5, 11):
        tracker.processed(3 * HOP_STRIDE + hop, latency=0.01, at=float(hop))
    result = tracker.comparison()
    assert (result["sent"], result["processed"], result["processings"]) == (10, 4, 5)
    assert result["lost"] == 7 and result["lost_sample"][:2] == [3 * HOP_STRIDE + 3,
                                                                  3 * HOP_STRIDE + 4]
    assert result["duplicated"] == 1 and result["unexpected"] == 1
    assert tracker.claim(7) and not tracker.claim(7)
