"""A Celery app whose publishing threads all share one AMQP connection per process.

    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ celery -A examples.celery_app worker \\
        --pool threads -c 8
    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ python -m examples.celery_app 50 40

The second command calls ``add.delay()`` 40 times from each of 50 threads, with publisher
confirms, and prints how many AMQP connections the process held (one). Everything else is
Celery's default configuration: there is no pool limit to tune.
"""

from __future__ import annotations

import os
import sys
import threading

from celery import Celery

from kombu_pyamqp_threadsafe import add_shared_amqp_transport

add_shared_amqp_transport()

app = Celery(
    "examples.celery_app",
    broker="shared+" + os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
)
# Each delay() returns once RabbitMQ has the message, from any thread.
app.conf.broker_transport_options = {"confirm_publish": True}


@app.task
def add(x: int, y: int) -> int:
    return x + y


def main(threads: int, each: int) -> None:
    import psutil

    def publish(index: int) -> None:
        for n in range(each):
            add.delay(index, n)

    workers = [threading.Thread(target=publish, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    held = [c for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port in (5671, 5672)]
    print(f"{threads * each} tasks sent from {threads} threads on {len(held)} AMQP connection(s)")


if __name__ == "__main__":
    threads, each = ([int(arg) for arg in sys.argv[1:3]] + [50, 40][len(sys.argv) - 1:])[:2]
    main(threads, each)
