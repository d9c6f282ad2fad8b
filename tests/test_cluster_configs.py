"""Every cluster definition validates offline: launcher YAMLs against Ray's schema, KubeRay manifests' fields."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from gan_dist.config import load_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yaml_matches_rays_schema(name):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(config, schema)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head runs the driver, not training"
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["max_workers"] >= 1 for t in workers)
    assert "pip install -e /home/ray/gan_dist" in config["setup_commands"]
    assert all("RAY_AUTH_MODE=" in c for c in config["head_start_ray_commands"] if c.startswith("RAY_"))


def _containers(pod_template):
    return pod_template["spec"]["containers"]


def _check_cluster_spec(spec):
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        for container in _containers(group["template"]):
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for container in _containers(head["template"]) + [c for g in groups for c in _containers(g["template"])]:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] in ("token", "disabled"), "auth mode set explicitly"
        for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[secret]["valueFrom"], f"{secret} must come from a Secret"
            assert "value" not in env[secret]
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")


def test_kuberay_raycluster_manifest():
    manifest = yaml.safe_load((CLUSTER / "kuberay/raycluster.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    assert manifest["metadata"]["name"]
    _check_cluster_spec(manifest["spec"])


def test_kuberay_rayjob_manifest_resumes_the_same_run_on_retry():
    manifest = yaml.safe_load((CLUSTER / "kuberay/rayjob.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("python -m gan_dist train ")
    assert "--set run.name=" in entrypoint, "a fixed run name makes a retried job resume, not restart"
    job_file = entrypoint.split()[4]
    assert (JOBS / Path(job_file).name).is_file()
    load_config(JOBS / Path(job_file).name)
    _check_cluster_spec(spec["rayClusterSpec"])
