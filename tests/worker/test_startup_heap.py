"""A serving process freezes its start-up heap out of the garbage collector.

A full collection walks every tracked object: in a worker that imported
vLLM (679k objects) it took 1.1 s on this 2-core machine, the loop stalled
all the while, and the streams with it; after ``gc.freeze()`` it takes
nothing (vllm serve freezes its own the same way). The worker and the
broker run here in this process, so the collector's state is theirs to see.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator

import pytest
import zmq

from zserve.broker.server import Broker, BrokerConfig
from zserve.launcher import free_port, wait_for
from zserve.worker.engines.null import NullEngine
from zserve.worker.runtime import Worker, WorkerConfig


@pytest.fixture
def thawed() -> Iterator[None]:
    """Start from a collector with nothing frozen; leave it so."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        yield
    finally:
        gc.unfreeze()


def test_the_worker_freezes_its_startup_heap(thawed: None) -> None:
    worker = Worker(NullEngine(["m"]), WorkerConfig(broker=f"tcp://127.0.0.1:{free_port()}"))
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_until_complete, args=(worker.run(),), daemon=True)
    t.start()
    try:
        wait_for(lambda: worker.sessions >= 1, 10, "the worker's first connection")
        assert gc.get_freeze_count() > 0, "the engine started and nothing was frozen"
    finally:
        loop.call_soon_threadsafe(worker.stop)
        t.join(10)
        loop.close()


def test_the_broker_freezes_its_startup_heap(thawed: None) -> None:
    ctx = zmq.Context()
    b = Broker(BrokerConfig(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*"), ctx)
    t = threading.Thread(target=b.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: gc.get_freeze_count() > 0, 10, "the broker's start-up heap frozen")
    finally:
        b.stop()
        t.join(10)
        b.close()
        ctx.term()
