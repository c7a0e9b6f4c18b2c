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


def test_node_holding_connections_and_leader_killed_loses_nothing_and_goes_on(
        rabbit_cluster, cluster_vhost):
    """kill -9 of the node that holds the consumer connection and the quorum queue's leader,
    restarted ``down`` s later: nothing lost, and a message sent after the kill is accepted
    and processed through the other nodes before the killed node is back."""
    result = cf.kill_case(rabbit_cluster, cluster_vhost, "kombu-quorum", SCALE)
    check(result)
    assert result.resumed is not None and result.resumed < SCALE.down, result.explain()


def test_frozen_node_is_left_through_heartbeats_and_no_send_hangs(rabbit_cluster, cluster_vhost):
    """The same node frozen (SIGSTOP, sockets open) for four heartbeat intervals: the client
    leaves it through heartbeats, and no single send() waits for the thaw (freeze_case counts
    a send stuck about as long as the freeze as a problem): every reply a send waits for (the
    confirm the hung queue leader holds, a channel or a declare on the hung connection) is
    given up after confirm_timeout (two intervals) and the send raises. The consumer, moved to
    another node, waits there in basic.consume for the hung leader: processing resumes when
    the node thaws (or the cluster declares it down: net_ticktime, 60 s by default)."""
    result = cf.freeze_case(rabbit_cluster, cluster_vhost, "kombu-quorum", SCALE)
    check(result)
    assert result.resumed is not None, result.explain()


def test_deleted_queue_is_declared_again_by_its_cancelled_consumer(rabbit_cluster,
                                                                   cluster_vhost):
    """The queue is deleted on the cluster while the worker runs: the server cancels the
    consumer (basic.cancel), which declares the queue again and consumes what is sent next."""
    result = cf.cancel_case(rabbit_cluster, cluster_vhost, "kombu-quorum", SCALE)
    check(result)
