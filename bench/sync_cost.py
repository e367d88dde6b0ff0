"""Replica sync's cost per request, piece by piece, in one process: what a synced replica adds
to kv_aware's own work (counting its dispatches and finishes, asking the policy which
dispatches to share, and building one state a window), encoding each window's messages as a
batch frame, a sibling decoding those frames and applying them to its policy, and the frames' trip
through a ZeroMQ PUB/SUB pair over ipc:// driven by the event loop as ``router.sync.service``
drives it between pods (a non-blocking send; the SUB socket drained when its descriptor
signals), and through the Unix socket link ``serve --workers`` uses (``router.sync.unix``).
In one quiet process a ZeroMQ I/O thread's wake-up is cheap; on a loaded host it is a
context switch, which only the live benchmark shows (bench/README.md).

    .venv/bin/python bench/sync_cost.py                     # compiled when `make native` built it
    KVROUTER_NATIVE=0 .venv/bin/python bench/sync_cost.py   # the Python sources

The workload is ``bench/overhead.py``'s hot prompt as kv_aware sees it: one 31-block chain
(~500 tokens at block size 16), 2 backends, 16 requests in flight, a flush window of 10
window every 5 requests (~2 ms at the ~2,500 requests/s a worker carries here). The hot
prompt's dispatches are shared once per ``record_refresh_s`` per backend (kv_aware's
``shares_dispatch``), so a window's frame is nearly always its state alone. Medians of 5
runs; the machine is shared, so compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable

from kvrouter import native

NATIVE = native.enable_from_env()[0]

import zmq  # noqa: E402

from policies.kv_aware import create  # noqa: E402  (after the native build is enabled)
from policies.replica_sync import Message, ReplicaSync, SyncedPolicy  # noqa: E402
from policies.types import BackendState, ClusterView, Policy, RouteRequest  # noqa: E402
from router.sync.unix import UnixLink  # noqa: E402
from router.sync.wire import decode_frame, encode_batch  # noqa: E402

WINDOW = 5  # requests per flush window
STATES = tuple(BackendState(f"http://pod-{i}", kv_usage_ratio=0.5, total_kv_blocks=10_000,
                            engine_waiting_requests=1, engine_running_requests=4)
               for i in range(2))


def _requests(n: int, blocks: int) -> list[RouteRequest]:
    rng = random.Random(1)
    chain = tuple(rng.getrandbits(63) for _ in range(blocks))
    return [RouteRequest(request_id=f"r{i}", model="m", prompt_tokens=blocks * 16 + 6,
                         block_hashes=chain, max_tokens=16, tokens_exact=True)
            for i in range(n)]


def _route(policy: Policy, requests: list[RouteRequest],
           end_window: Callable[[float], None] = lambda now_s: None) -> float:
    """Seconds to route ``requests`` (defer, choose, on_dispatched; on_finished 16 behind),
    ending a flush window every ``WINDOW`` requests."""
    decisions = []
    start = time.perf_counter()
    for i, request in enumerate(requests):
        now_s = i * 0.0004
        view = ClusterView(now_s, STATES)
        policy.defer(request, view)
        decision = policy.choose(request, view)
        policy.on_dispatched(request, decision, now_s)
        decisions.append(decision)
        if i >= 16:
            policy.on_finished(requests[i - 16], decisions[i - 16], now_s, True)
        if i % WINDOW == WINDOW - 1:
            end_window(now_s)
    return time.perf_counter() - start


def _synced(windows: list[list[Message]] | None) -> tuple[SyncedPolicy, Callable[[float], None]]:
    """A synced kv_aware, and its window's end (``ReplicaSync.flush``, as
    ``router.sync.service`` calls it), the windows' messages kept in ``windows`` when given."""
    inner = create({}, random.Random(0))
    sync = ReplicaSync("a", inner)

    def end_window(now_s: float) -> None:
        batch = sync.flush(now_s)
        if windows is not None and batch:
            windows.append(batch)

    return SyncedPolicy(inner, sync), end_window


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread: ZeroMQ's I/O threads too
    return usage.ru_utime + usage.ru_stime


async def _transport_s(frames: list[bytes]) -> float:
    """CPU seconds to send ``frames`` through PUB and receive them at SUB, as the service does."""
    loop = asyncio.get_running_loop()
    context = zmq.Context()
    with tempfile.TemporaryDirectory() as directory:
        pub, sub = context.socket(zmq.PUB), context.socket(zmq.SUB)
        pub.setsockopt(zmq.SNDHWM, 100_000)
        pub.bind(f"ipc://{directory}/sync.sock")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"ipc://{directory}/sync.sock")
        await asyncio.sleep(0.3)  # the subscription reaches the publisher
        done = loop.create_future()
        got = 0

        def drain() -> None:
            nonlocal got
            while sub.get(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[operator]
                sub.recv_multipart(zmq.NOBLOCK)
                got += 1
            if got == len(frames) and not done.done():
                done.set_result(None)

        fd = sub.get(zmq.FD)
        loop.add_reader(fd, drain)
        start = _cpu_s()
        for i, frame in enumerate(frames):
            pub.send_multipart([frame], zmq.NOBLOCK)
            if i % 5 == 0:
                await asyncio.sleep(0)
        while not done.done():  # an edge the descriptor did not signal, as the tick catches
            drain()
            await asyncio.sleep(0.001)
        spent = _cpu_s() - start
        loop.remove_reader(fd)
        pub.close(0)
        sub.close(0)
    context.term()
    return spent


async def _unix_transport_s(frames: list[bytes]) -> float:
    """CPU seconds to send ``frames`` through ``router.sync.unix`` and receive them, as
    ``serve --workers`` does: one link listening, one connected to it, on one event loop."""
    got = 0
    done = asyncio.get_running_loop().create_future()

    def receive(batch: list[bytes]) -> None:
        nonlocal got
        got += len(batch)
        if got == len(frames) and not done.done():
            done.set_result(None)

    with tempfile.TemporaryDirectory() as directory:
        sender = UnixLink(f"{directory}/a.sock", lambda batch: None)
        receiver = UnixLink(f"{directory}/b.sock", receive)
        await sender.start()
        assert await receiver.connect(f"unix://{sender.path}")
        for _ in range(1000):  # the sender accepts the connection on a later loop turn
            if sender._senders:
                break
            await asyncio.sleep(0.001)
        start = _cpu_s()
        for i, frame in enumerate(frames):
            sender.send([frame])
            if i % 5 == 0:
                await asyncio.sleep(0)
        await done
        spent = _cpu_s() - start
        await receiver.close()
        await sender.close()
    return spent


def run_once(requests: list[RouteRequest]) -> dict[str, float]:
    n = len(requests)
    plain = _route(create({}, random.Random(0)), requests)
    # Timed with the messages dropped as soon as they are built: a live worker encodes and
    # lets go of them every flush window, and an outbox holding a whole run's messages
    # charged the collector's growing scans to stamping (5.7 us against 1.3 us).
    policy, end_window = _synced(None)
    synced = _route(policy, requests, end_window)
    windows: list[list[Message]] = []  # the same messages again, untimed, for the pieces below
    policy, end_window = _synced(windows)
    _route(policy, requests, end_window)
    start = time.perf_counter()
    frames = [encode_batch(window, monotonic_now_s=1.0, unix_now_s=1000.0, prompt_text=False)
              for window in windows]
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded = [decode_frame(f, monotonic_now_s=2.0, unix_now_s=1001.0) for f in frames]
    decode_s = time.perf_counter() - start
    sibling = ReplicaSync("b", create({}, random.Random(0)))
    start = time.perf_counter()
    for messages in decoded:
        for message in messages:
            sibling.receive(message, 2.0)
    replay_s = time.perf_counter() - start
    transport_s = asyncio.run(_transport_s(frames))
    unix_s = asyncio.run(_unix_transport_s(frames))
    us = 1e6 / n
    return {"kv_aware's own routing": plain * us,
            "stamping: counting, sharing, one state a window": (synced - plain) * us,
            "encoding (batch frames)": encode_s * us,
            "decoding at a sibling": decode_s * us,
            "applying them to the sibling's kv_aware": replay_s * us,
            "ZeroMQ PUB -> SUB over ipc://, both sides' CPU": transport_s * us,
            "Unix socket link (serve --workers), both sides' CPU": unix_s * us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--blocks", type=int, default=31)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    requests = _requests(args.requests, args.blocks)
    run_once(requests[:500])  # warm-up: first calls, caches, the interpreter's specialisation
    runs = [run_once(requests) for _ in range(args.runs)]
    print(f"replica sync, {'compiled (make native)' if NATIVE else 'from the Python sources'}; "
          f"{args.blocks}-block prompt, a window every {WINDOW} requests")
    print(f"| piece | us per request (median of {args.runs}) |")
    print("|---|---:|")
    for name in runs[0]:
        print(f"| {name} | {statistics.median(r[name] for r in runs):.1f} |")


if __name__ == "__main__":
    main()
