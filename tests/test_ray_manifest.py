"""deploy/kuberay/trit-rayservice.yaml: valid YAML, a RayService whose Serve
config names trit.ray's real application builder with arguments it takes, and
shown in README.md as it is. Needs no cluster (and Ray only for the last check)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="reading the manifest needs PyYAML")

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kuberay" / "trit-rayservice.yaml"


def manifest() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    return document


def application() -> dict[str, Any]:
    serve_config = yaml.safe_load(manifest()["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert isinstance(app, dict)
    return app


def test_the_manifest_is_a_rayservice_of_trit_ray() -> None:
    document = manifest()
    assert document["apiVersion"] == "ray.io/v1" and document["kind"] == "RayService"
    app = application()
    assert app["import_path"] == "trit.ray:app_builder"
    assert app["route_prefix"] == "/"
    cluster = document["spec"]["rayClusterConfig"]
    images = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]] + [
        group["template"]["spec"]["containers"][0]["image"] for group in cluster["workerGroupSpecs"]
    ]
    assert set(images) == {"trit-ray:0.1.0"}  # the tag deploy/kuberay/Dockerfile builds
    assert "-t trit-ray:0.1.0" in (MANIFEST.parent / "Dockerfile").read_text()


def test_the_readme_shows_the_manifest_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"```text\n{MANIFEST.read_text()}```\n" in readme


def test_the_builder_takes_the_manifests_arguments() -> None:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("building the application needs the ray extra")
    from ray import serve

    import trit.ray

    module, _, name = application()["import_path"].partition(":")
    assert module == trit.ray.__name__
    built = getattr(trit.ray, name)(application()["args"])
    assert isinstance(built, serve.Application)
