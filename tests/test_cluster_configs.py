"""Every cluster definition validates offline: launcher YAMLs against Ray's schema, KubeRay manifests' fields, and
the security rules of docs/security.md: no definition turns authentication off, KubeRay manifests use authOptions
token mode and take every credential from a Secret, dashboards listen on 127.0.0.1 unless others must reach them."""

import json
import re
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
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0], "reached through `ray dashboard` (SSH), not the network"
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token", "every node gets the token"


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
    assert spec["authOptions"]["mode"] == "token", "KubeRay generates the token Secret and hands it to every pod"
    for container in _containers(head["template"]) + [c for g in groups for c in _containers(g["template"])]:
        env = {e["name"]: e for e in container["env"]}
        assert "RAY_AUTH_MODE" not in env and "RAY_AUTH_TOKEN" not in env, "authOptions sets them"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} <= set(env)
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")


CREDENTIAL_NAME = re.compile(r"^AWS_.*KEY|PASSWORD|TOKEN|SECRET", re.IGNORECASE)


def _env_entries(tree):
    """Every environment variable entry ({name, value | valueFrom}) anywhere in a manifest."""
    if isinstance(tree, dict):
        if "name" in tree and ("value" in tree or "valueFrom" in tree):
            yield tree
        for child in tree.values():
            yield from _env_entries(child)
    elif isinstance(tree, list):
        for child in tree:
            yield from _env_entries(child)


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_credentials_come_from_secrets(name):
    entries = list(_env_entries(yaml.safe_load((CLUSTER / name).read_text())))
    credentials = [e for e in entries if CREDENTIAL_NAME.search(e["name"])]
    declared = {e["name"] for e in credentials}
    assert declared >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"}
    for entry in credentials:
        assert "value" not in entry, f"{name}: {entry['name']} has a literal value"
        assert "secretKeyRef" in entry["valueFrom"], f"{name}: {entry['name']} must come from a Secret"


def test_no_cluster_definition_turns_authentication_off():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert {"local.sh", "aws.yaml", "gcp.yaml", "raycluster.yaml", "rayjob.yaml", "Dockerfile"} <= {p.name for p in files}
    for path in files:
        text = path.read_text()
        assert not [line for line in text.splitlines() if "RAY_AUTH_MODE" in line and "disabled" in line], path
        if path.suffix == ".yaml":
            tree = yaml.safe_load(text)
            modes = [e.get("value") for e in _env_entries(tree) if e["name"] == "RAY_AUTH_MODE"]
            assert all(mode == "token" for mode in modes), path
            assert "mode: disabled" not in text, path
    local = (CLUSTER / "local.sh").read_text()
    assert "export RAY_AUTH_MODE=token" in local and "--dashboard-host=127.0.0.1" in local


def test_kuberay_raycluster_dashboard_listens_on_loopback():
    manifest = yaml.safe_load((CLUSTER / "kuberay/raycluster.yaml").read_text())
    assert manifest["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


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
