"""The ``rabbit_cluster`` and ``cluster_vhost`` session fixtures: the local 3-node cluster of
``scripts/rabbitmq-cluster`` (driven by :class:`stress.cluster_faults.Cluster`), started the
first time a test asks for it and stopped when the session ends. A cluster that cannot start
fails the tests that need it, never a skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from stress.cluster_faults import Cluster, ClusterError


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[Cluster]:
    """The local cluster, started for this session when a test first needs it (a cluster left
    running by ``make cluster`` is used as it is and left running), stopped at the end."""
    cluster = Cluster()
    started = False
    if not cluster.running():
        try:
            cluster.start()
        except ClusterError as exc:
            pytest.fail(f"the local RabbitMQ cluster does not start (the cluster tests need it; "
                        f"scripts/rabbitmq-cluster start): {exc}", pytrace=False)
        started = True
    try:
        yield cluster
    finally:
        if started:
            cluster.stop()
        else:
            cluster.heal()


@pytest.fixture(scope="session")
def cluster_vhost(rabbit_cluster: Cluster) -> Iterator[str]:
    """A fresh vhost on the cluster for this session, deleted at the end."""
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    rabbit_cluster.add_vhost(name)
    try:
        yield name
    finally:
        rabbit_cluster.heal()
        rabbit_cluster.delete_vhost(name)
