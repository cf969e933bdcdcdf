"""The Serve config files in cluster/: valid for Ray Serve, and `serve run` of the tiny one serves the app."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from tests.integration.serve_process import free_port, start

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "cluster").glob("serve.*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_serve_configs_are_valid_and_build_the_app(path):
    from bp_ray.serve.app import app_builder

    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = config.applications
    assert app.import_path == "bp_ray.serve.app:app_builder" and app.route_prefix == "/"
    preset = app.args["preset"]
    assert path.name == f"serve.{preset}.yaml"
    # The builder resolves the preset and binds the deployments (nothing loads until Serve starts them).
    application = app_builder({**app.args, "model": "some/checkpoint"})
    assert type(application).__name__ == "Application"


@pytest.mark.integration
def test_serve_run_of_the_tiny_config_serves_the_beautifier(tmp_path, tiny_models_cfg):
    config = yaml.safe_load((REPO / "cluster" / "serve.tiny.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["overrides"] = [f"models.zoo_dir={tiny_models_cfg.zoo_dir}",
                                                      "serve.enable_render=false", "serve.max_replicas=1"]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).with_name("serve")
    process = start([str(serve_cli), "run", str(path)], tmp_path / "serve-run.log", f"http://127.0.0.1:{port}")
    try:
        response = httpx.post(process.url + "/v1/beautify", json={"prompt": "a cat", "seed": 1}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["tokens"] > 0
        render = httpx.post(process.url + "/v1/render", json={"prompt": "a cat"}, timeout=60)
        assert render.status_code == 404 and "rendering is off" in render.json()["error"]["message"]
    finally:
        # `serve run` deletes its application and stops on Ctrl-C.
        assert process.stop(sig=signal.SIGINT) in (0, 130), process.log_tail()
