"""Steady classify load over a round-robin, retrying channel, until SIGTERM; then a JSON report.

Runs inside the serving image on the stack's network while something disturbs the service (a rolling
update, a killed task), and reports how many calls were sent and how they ended:

    docker run --rm --network nnserve_grpc --entrypoint python3 \\
        -v "$PWD/deploy/swarm/steady_load.py:/steady_load.py:ro" nnserve-serve /steady_load.py \\
        dns:///tasks.classify:50051 --concurrency 4
    # ... docker stop <that container>  ->  last line {"total": ..., "ok": ..., "failed": {...}, ...}

Every second it prints {"progress": <calls so far>}, so a test can see the load flowing before and
after the disturbance.

The channel is the one the README recommends for replicated services: `channel_options(round_robin=True,
retry=True)` (round_robin over every task address, UNAVAILABLE retried with backoff, client-side
health checking), and for a client that lives through task replacements:

- waitForReady in the same service config: in the moment between the last old task draining and the
  channel reaching a new one, a call waits for a ready task (within its deadline) instead of failing
  at once with "connections to all backends failing" (seen without it: 2 of 26,028 calls in one
  rolling update on a loaded machine);
- a short minimum time between DNS re-resolutions (gRPC's default is 30 s) and a short reconnect
  backoff, so new task addresses are learnt and connected within about a second.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from collections import Counter

import grpc
import numpy as np

from services.client import RETRY_SERVICE_CONFIG, ClassifyClient, channel_options


def main() -> None:
    """Parse flags, run the callers until SIGTERM/SIGINT (or --duration), print the counts as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="e.g. dns:///tasks.classify:50051")
    p.add_argument("--concurrency", type=int, default=4, help="callers, each with one call in flight")
    p.add_argument("--duration", type=float, default=300.0, help="stop after this many seconds anyway")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of each call")
    args = p.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    config = json.loads(RETRY_SERVICE_CONFIG)
    for method in config["methodConfig"]:
        method["waitForReady"] = True
    options = [o for o in channel_options(round_robin=True, retry=True) if o[0] != "grpc.service_config"]
    options += [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.dns_min_time_between_resolutions_ms", 1000),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    channel = grpc.insecure_channel(args.target, options=options)
    client = ClassifyClient(args.target, channel=channel)
    image = np.random.default_rng(0).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    codes: Counter[str] = Counter()
    details: list[str] = []
    lock = threading.Lock()

    def caller() -> None:
        while not stop.is_set():
            try:
                client.classify(tensor=image, top_k=1, timeout=args.timeout)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
                with lock:
                    if len(details) < 10:
                        details.append(f"{time.strftime('%H:%M:%S')} {code}: {e.details()}")
            with lock:
                codes[code] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=caller, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    deadline = started + args.duration
    while not stop.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
        with lock:
            print(json.dumps({"progress": sum(codes.values())}), flush=True)
        if time.monotonic() >= deadline:
            break
    stop.set()
    for t in threads:
        t.join(args.timeout + 5)
    channel.close()
    failed = {k: v for k, v in codes.items() if k != "OK"}
    report = {
        "total": sum(codes.values()),
        "ok": codes["OK"],
        "failed": failed,
        "seconds": round(time.monotonic() - started, 1),
        "first_errors": details,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
