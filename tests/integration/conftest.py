"""One local Ray for the integration tests that need it (2 CPUs, no dashboard), shut down at the end."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from bp_ray.ray_runtime import WORKER_ENV

    if not ray.is_initialized():
        # "local": a fresh instance even if a `ray start` head (or a stale record of one) is on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV},
                 logging_level="WARNING")
    yield ray
    ray.shutdown()
