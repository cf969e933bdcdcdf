"""init_ray starts its own local Ray when no address is configured, whatever an earlier `ray start` left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_a_stale_cluster_record_does_not_stop_a_local_run(tmp_path):
    from ray._private.utils import get_ray_address_file

    record = Path(get_ray_address_file(None))  # where `ray start` records its head (/tmp/ray/ray_current_cluster)
    saved = record.read_text() if record.exists() else None
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("127.0.0.1:1")  # a head that was killed (nothing listens on port 1)
    try:
        code = ("from bp_ray.config import ClusterConfig; from bp_ray.ray_runtime import init_ray; import ray; "
                "init_ray(ClusterConfig(num_cpus=2)); print(int(ray.cluster_resources()['CPU']))")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    finally:
        if saved is None:
            record.unlink(missing_ok=True)
        else:
            record.write_text(saved)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "2"
