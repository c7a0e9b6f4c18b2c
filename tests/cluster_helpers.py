"""The local 3-node RabbitMQ cluster of ``scripts/rabbitmq-cluster``, driven from Python.

:class:`Cluster` wraps the script (start, stop, kill, freeze, thaw, restart) and administers
the nodes with ``rabbitmqctl -n NODE`` through it (``scripts/rabbitmq-cluster ctl N ...``),
always asking a node that is up. The ``rabbit_cluster`` session fixture starts the cluster the
first time a test asks for it and stops it when the session ends; a cluster that cannot start
fails the tests that need it (never a skip).

Facts used here (RabbitMQ 3.10, checked on the cluster): ``list_connections`` has no node
column (and its JSON pids do not name the node), but its ``port`` is the node's AMQP port;
``list_queues`` gives a quorum queue's ``leader`` and, in its text output, a classic queue's
``pid`` as ``<kc2@localhost.1701.1234.0>``, which names the node; a quorum queue's leader
starts on the node of the client that declared it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

import rabbit_admin

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "rabbitmq-cluster"
NODES = (1, 2, 3)
PREFIX = "kc"
AMQP_BASE = 5690

_NODE_RE = re.compile(rf"{PREFIX}([1-3])@")


class ClusterError(RuntimeError):
    """The cluster script failed (its output says why)."""


def node_index(text: str) -> int:
    """The node number named in ``text`` (a node name, or a pid like ``<kc2@localhost.1.2.3>``)."""
    found = _NODE_RE.search(text)
    if found is None:
        raise ValueError(f"no cluster node named in {text!r}")
    return int(found.group(1))


class Cluster:
    """The three nodes; :attr:`down` holds the nodes killed, frozen or stopped through it."""

    def __init__(self, script: Path = SCRIPT) -> None:
        self.script = script
        self.down: set[int] = set()

    # -- the script -----------------------------------------------------------------------

    def run(self, *args: str, timeout: float = 240) -> str:
        try:
            proc = subprocess.run([str(self.script), *args], capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{self.script.name} {' '.join(args)} timed out after "
                               f"{timeout} s") from exc
        if proc.returncode != 0:
            raise ClusterError(f"{self.script.name} {' '.join(args)} exited with "
                               f"{proc.returncode}: {proc.stderr.strip()} {proc.stdout.strip()}")
        return proc.stdout

    def running(self) -> bool:
        """All three nodes run as one cluster."""
        try:
            self.run("status", timeout=60)
        except ClusterError:
            return False
        return True

    def start(self) -> None:
        self.run("start")
        self.down.clear()

    def stop(self) -> None:
        self.run("stop", timeout=120)

    def kill(self, node: int) -> None:
        """``kill -9`` of the node's VM (returns once it is gone)."""
        self.down.add(node)
        self.run("kill", str(node))

    def freeze(self, node: int) -> None:
        self.down.add(node)
        self.run("freeze", str(node))

    def thaw(self, node: int) -> None:
        self.run("thaw", str(node))
        self.down.discard(node)

    def restart(self, node: int) -> None:
        """Bring the node back (after kill, freeze or stop_app) and wait until it runs."""
        self.run("restart", str(node))
        self.down.discard(node)

    def stop_app(self, node: int) -> None:
        self.down.add(node)
        self.ctl("stop_app", node=node, timeout=120)

    def start_app(self, node: int) -> None:
        self.ctl("start_app", node=node, timeout=180)
        self.ctl("await_startup", node=node, timeout=180)
        self.down.discard(node)

    def heal(self) -> None:
        """Every node up again (after a test that failed half-way)."""
        for node in sorted(self.down):
            self.restart(node)

    # -- addresses ------------------------------------------------------------------------

    @staticmethod
    def node_name(node: int) -> str:
        return f"{PREFIX}{node}@localhost"

    @staticmethod
    def port(node: int) -> int:
        return AMQP_BASE + node

    def url(self, node: int, vhost: str = "/", *, user: str = "guest",
            password: str = "guest", query: str = "") -> str:
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
        url = f"amqp://{credentials}@127.0.0.1:{self.port(node)}/{quote(vhost, safe='')}"
        return f"{url}?{query}" if query else url

    def urls(self, vhost: str = "/", **kwargs: Any) -> list[str]:
        return [self.url(node, vhost, **kwargs) for node in NODES]

    # -- administration -------------------------------------------------------------------

    def live_node(self) -> int:
        for node in NODES:
            if node not in self.down:
                return node
        raise ClusterError("every node of the cluster is down")

    def ctl(self, *args: str, node: int | None = None, timeout: float = 60) -> str:
        """``rabbitmqctl ARGS`` against ``node`` (default: the first node that is up)."""
        return self.run("ctl", str(node or self.live_node()), *args, timeout=timeout)

    def rows(self, *args: str, node: int | None = None) -> list[dict[str, Any]]:
        text = self.ctl(*args, "--formatter", "json", "--quiet", node=node).strip()
        return json.loads(text) if text else []

    def add_vhost(self, name: str) -> None:
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")

    def delete_vhost(self, name: str) -> None:
        self.ctl("delete_vhost", name, timeout=120)

    def connection_nodes(self, vhost: str) -> dict[str, list[int]]:
        """The node of each connection of ``vhost``, by client connection_name."""
        result: dict[str, list[int]] = {}
        for row in self.rows("list_connections", "client_properties", "vhost", "port"):
            if row.get("vhost") != vhost:
                continue
            props = rabbit_admin.table_to_dict(row.get("client_properties"))
            result.setdefault(str(props.get("connection_name")), []).append(
                int(row["port"]) - AMQP_BASE)
        return result

    def queues(self, vhost: str) -> dict[str, dict[str, Any]]:
        """``list_queues`` of ``vhost`` by name: ``type``, ``messages``, and ``node`` (the
        quorum leader or the classic queue's node, a node number; None when unknown)."""
        # The text output, not JSON: JSON shows a pid as #PID<12726.1569.0>, without its node.
        text = self.ctl("list_queues", "-p", vhost, "name", "type", "messages", "leader", "pid",
                        "--quiet", "--no-table-headers")
        result: dict[str, dict[str, Any]] = {}
        for line in text.splitlines():
            fields = line.split("\t")
            if len(fields) < 5:
                continue
            name, kind, messages, leader, pid = fields[:5]
            try:
                node: int | None = node_index(leader if leader.strip() else pid)
            except ValueError:
                node = None
            result[name] = {"type": kind, "messages": int(messages or 0) if messages.isdigit()
                            else 0, "node": node}
        return result

    def queue_node(self, vhost: str, queue: str) -> int | None:
        return self.queues(vhost).get(queue, {}).get("node")

    def wait_connections(self, vhost: str, names: list[str], timeout: float = 20,
                         avoid: int | None = None) -> dict[str, list[int]]:
        """Poll until each of ``names`` has exactly one connection (on a node other than
        ``avoid``); the last listing."""
        deadline = time.monotonic() + timeout
        while True:
            listing = self.connection_nodes(vhost)
            if all(len(listing.get(n, [])) == 1 and avoid not in listing[n] for n in names):
                return listing
            if time.monotonic() >= deadline:
                return listing
            time.sleep(0.3)

    def delete_queue(self, vhost: str, queue: str) -> None:
        self.ctl("delete_queue", "-p", vhost, queue)


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
