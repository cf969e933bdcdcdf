"""One local Ray for the integration tests that need it (2 CPUs, dashboard on 127.0.0.1), shut down at the end."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from bp_ray.ray_runtime import WORKER_ENV

    if not ray.is_initialized():
        # with the dashboard, as bp-ray's own init_ray: without it the first Ray Train run waits ~55 s for its state
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env={"env_vars": WORKER_ENV},
                 logging_level="WARNING")
    yield ray
    ray.shutdown()
