"""`bp-ray serve` that also logs the generator's replicas, for the autoscaling test.

    python tests/integration/serve_replica_log.py REPLICA_LOG --preset tiny --set serve.port=8000 --set ...

It starts and stops the endpoint with the same `start_serve` / `stop_serve` as `bp-ray serve`, and in between polls
Serve's status API (`serve.status()`) from this driver, which is connected to the endpoint's Ray: each time the
Generator's replica states or status change it appends a JSON line to REPLICA_LOG, stamped with
`time.monotonic()` (one clock for every process on the machine, so the test can set it against its load).

Why here and not from the test: the test process holds no Ray connection (another test's session-wide Ray may be
there), and Ray started by `ray.init` writes no address that another driver could find. Polling and shutting down
on the one thread means no status call can race `ray.shutdown()` (`serve.status()` on a stopped Ray would start a
new one).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

POLL_S = 0.25
"""How often to ask the controller: often enough to see a replica that lives a few seconds, and cheap."""


def generator_state(app_name: str) -> dict[str, Any] | None:
    """The Generator deployment's status and replica counts by state, or None before the application exists."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    deployment = app.deployments.get("Generator") if app else None
    if deployment is None:
        return None
    return {"status": str(getattr(deployment.status, "value", deployment.status)),
            "replicas": {str(getattr(state, "value", state)): count
                         for state, count in sorted(deployment.replica_states.items()) if count}}


def main(argv: list[str]) -> int:
    from bp_ray.config_loader import load_config
    from bp_ray.serve.runner import APP_NAME, start_serve, stop_serve

    parser = argparse.ArgumentParser()
    parser.add_argument("replica_log", type=Path)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = start_serve(load_config(args.preset, args.overrides))
        # Again after ray.init, which installs its own SIGTERM handler (as `bp-ray serve` does).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"bp-ray serve: ready at {url}", flush=True)
        last = None
        with args.replica_log.open("a") as log:
            while not stop.wait(POLL_S):
                try:
                    state = generator_state(APP_NAME)
                except Exception as error:  # a slow controller must not end the log; the entry says what failed
                    state = {"error": f"{type(error).__name__}: {error}"}
                if state is not None and state != last:
                    log.write(json.dumps({"t": time.monotonic(), **state}) + "\n")
                    log.flush()
                    last = state
        print("bp-ray serve: shutting down", flush=True)
    finally:
        stop_serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
