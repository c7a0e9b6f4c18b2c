"""Node loss under load on the local 3-node cluster: nothing is lost, the broker goes on.

Each case runs a 64-thread dramatiq Worker on KombuBroker with the three nodes' URLs while 8
threads send a couple of thousand messages with ids, injects one fault on a node, and counts
lost (must be 0) and duplicated (allowed) messages. The durations are shorter than those of
``python -m stress.faults --cluster`` (the README's table) to keep the suite's time: the
``rabbit_cluster`` fixture starts the cluster once (about 25 s) for the whole session.
"""

from __future__ import annotations

import pytest

import stress.cluster_faults as cf

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

SCALE = cf.PYTEST_SCALE


def check(result: cf.ClusterResult) -> None:
    print("\n" + cf.markdown_table([result]) + "\n" + cf.details_table([result]))
    assert result.lost == 0, f"lost ids (first 20): {result.lost_ids[:20]}"
    assert not result.problems, result.explain()
    assert result.sent >= SCALE.messages


def test_classic_queue_node_killed_logs_queue_and_node_and_loses_nothing(
        rabbit_cluster, cluster_vhost):
    """A classic queue's node is killed while the consumer sits on another node: the consumer
    logs the server's error naming the queue and its node, retries, and once the node is back
    every message sent is processed."""
    result = cf.classic_kill_case(rabbit_cluster, cluster_vhost, "kombu-classic", SCALE)
    check(result)
    assert any("logged:" in note and "home node" in note for note in result.notes), result.notes


def test_rolling_restart_loses_nothing(rabbit_cluster, cluster_vhost):
    """stop_app/start_app of each node in turn under load: nothing lost, the broker works
    after each node's stop."""
    check(cf.rolling_case(rabbit_cluster, cluster_vhost, "kombu-quorum", SCALE))
