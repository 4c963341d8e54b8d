"""The real local SLURM cluster for these tests.

Tests that need it skip with a reason only when it is not running AND
MEGALONG_REQUIRE_SLURM is unset; CI sets that variable, so there a missing cluster fails.
Start it with ``slurm/local_cluster.sh start``.
"""

import os

import pytest

from tests.slurm.cluster import cluster_env


@pytest.fixture(scope="session")
def slurm_env():
    env = cluster_env()
    if env is None:
        message = ("no local SLURM cluster is running (start it with `slurm/local_cluster.sh start`; "
                   "state dir $MEGALONG_SLURM_DIR, default /tmp/megalong-slurm)")
        if os.environ.get("MEGALONG_REQUIRE_SLURM"):
            pytest.fail(message + " and MEGALONG_REQUIRE_SLURM is set")
        pytest.skip(message + "; set MEGALONG_REQUIRE_SLURM=1 to make this a failure")
    return env
