"""`bp-ray serve`: start the beautifier on a local Ray (or join a cluster) and keep it up until Ctrl-C or SIGTERM,
then shut Serve down cleanly."""

from __future__ import annotations

import logging
import signal
import threading

from bp_ray.config import PipelineConfig

logger = logging.getLogger(__name__)

APP_NAME = "beautifier"


def required_cpus(cfg: PipelineConfig) -> float:
    """CPUs the application needs at its minimum size: ingress, at least one generator, the renderer."""
    s = cfg.serve
    return (max(1, s.min_replicas) * s.num_cpus_per_replica + s.ingress_replicas * s.ingress_cpus
            + (s.render_cpus if s.enable_render else 0.0))


def start_serve(cfg: PipelineConfig, checkpoint: str | None = None) -> str:
    """Deploy the application (Ray started or joined first); returns its base URL once it answers."""
    from ray import serve

    from bp_ray.ray_runtime import init_ray, require_resources
    from bp_ray.serve.app import build_app, serve_checkpoint

    s = cfg.serve
    init_ray(cfg.cluster, metrics_export_port=s.metrics_port)
    require_resources(cfg.cluster, required_cpus(cfg), max(1, s.min_replicas) * s.num_gpus_per_replica
                      + (s.render_gpus if s.enable_render else 0.0), "the beautifier endpoint")
    checkpoint = checkpoint or serve_checkpoint(cfg)
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app(cfg, checkpoint), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{s.host}:{s.port}"


def stop_serve() -> None:
    import ray
    from ray import serve

    # Deleting the application first lets its replicas stop before the controller goes; a bare
    # serve.shutdown() after a signal was measured to wait out its 30 s controller timeout.
    try:
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()


def run_serve(cfg: PipelineConfig, checkpoint: str | None = None, stop: threading.Event | None = None) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (or `stop` is set), then shut down Serve and Ray."""
    stop = stop or threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        url = start_serve(cfg, checkpoint)
        # Again after ray.init, which installs its own SIGTERM handler (that one exits without shutting down).
        for sig in signals:
            signal.signal(sig, lambda *_: stop.set())
        print(f"bp-ray serve: ready at {url} (POST /v1/beautify, OpenAI API under {url}/v1, docs at {url}/docs); "
              "Ctrl-C stops it", flush=True)
        if cfg.serve.metrics_port:
            print(f"bp-ray serve: Prometheus metrics at http://127.0.0.1:{cfg.serve.metrics_port}/metrics",
                  flush=True)
        stop.wait()
        print("bp-ray serve: shutting down", flush=True)
    finally:
        stop_serve()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
