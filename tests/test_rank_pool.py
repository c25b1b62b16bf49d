"""The test harness itself: results come back per rank, failures carry the traceback."""

import pytest

import pool_checks
from moe_a2a.testing import RankFailed, RankPool


def test_pool_runs_collectives_and_survives_a_failure():
    with RankPool(2) as pool:
        assert pool.run(pool_checks.allsum, 1) == [3, 3]
        with pytest.raises(RankFailed, match="rank 1 fails on purpose"):
            pool.run(pool_checks.fail_on_rank_1)
        assert pool.run(pool_checks.allsum, 2) == [5, 5]  # restarted after the failure
