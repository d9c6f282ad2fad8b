"""Every cluster definition validates offline: launcher YAMLs against Ray's schema, KubeRay manifests' fields, and
the security rules of docs/security.md: no definition turns authentication off, KubeRay manifests use authOptions
token mode and take every credential from a Secret, dashboards listen on 127.0.0.1 unless others must reach them.
KubeRay manifests also fit the jobs they run: the RayJob pins its job file's own run.name, its entrypoint leaves
nothing to the submitter pod's shell, and every pod outlives the job's preemption grace."""

import json
import re
import shlex
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


def _rayjob_job(entrypoint: str) -> tuple[Path, list[str]]:
    """The job file (in jobs/) and the --set overrides of a `python -m gan_dist train FILE --set ...` entrypoint."""
    words = shlex.split(entrypoint)
    assert words[:4] == ["python", "-m", "gan_dist", "train"], entrypoint
    overrides = [value for flag, value in zip(words[5::2], words[6::2]) if flag == "--set"]
    assert len(overrides) * 2 == len(words) - 5, f"only --set options expected: {entrypoint}"
    return JOBS / Path(words[4]).name, overrides


def test_kuberay_rayjob_manifest_resumes_the_same_run_on_retry():
    manifest = yaml.safe_load((CLUSTER / "kuberay/rayjob.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1
    job_file, overrides = _rayjob_job(spec["entrypoint"])
    assert job_file.is_file()
    pinned = [item.split("=", 1)[1] for item in overrides if item.startswith("run.name=")]
    assert pinned, "a fixed run name makes a retried job resume, not restart"
    # The job file's own run.name: the run `gan-dist submit` of the same file continues, not a second one.
    assert pinned == [load_config(job_file).run.name]
    cfg = load_config(job_file, overrides)
    tracking = {e["value"] for e in _env_entries(spec) if e["name"] == "MLFLOW_TRACKING_URI"}
    assert tracking == {cfg.tracking.uri}, "the run logs to the MLflow server the pods are set up for"
    _check_cluster_spec(spec["rayClusterSpec"])


def _entrypoints(tree):
    if isinstance(tree, dict):
        yield from (v for k, v in tree.items() if k == "entrypoint")
        for child in tree.values():
            yield from _entrypoints(child)
    elif isinstance(tree, list):
        for child in tree:
            yield from _entrypoints(child)


def test_no_entrypoint_leaves_a_variable_to_the_submitters_shell():
    # KubeRay pastes spec.entrypoint unquoted into the submitter pod's `bash -c` line, where none of the Ray pods'
    # env exists: `$MLFLOW_TRACKING_URI` there becomes an empty string.
    found = {path: list(_entrypoints(yaml.safe_load(path.read_text()))) for path in CLUSTER.rglob("*.yaml")}
    assert found[CLUSTER / "kuberay/rayjob.yaml"], "the RayJob's entrypoint is looked at"
    for path, entrypoints in found.items():
        for entrypoint in entrypoints:
            assert "$" not in entrypoint and "`" not in entrypoint, f"{path.name}: {entrypoint}"


# After the grace, the preemption checkpoint is still uploading and Ray shuts down: the pod needs this much more.
SHUTDOWN_MARGIN_S = 30


def _pod_templates(cluster_spec):
    return [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_pods_outlive_the_preemption_grace(name):
    manifest = yaml.safe_load((CLUSTER / name).read_text())
    if manifest["kind"] == "RayJob":
        cluster, graces = manifest["spec"]["rayClusterSpec"], [load_config(*_rayjob_job(manifest["spec"]["entrypoint"]))]
    else:  # a standing cluster runs any of the shipped jobs
        cluster, graces = manifest["spec"], [load_config(path) for path in JOBS.glob("*.yaml")]
    needed = max(cfg.train.preempt_grace_s for cfg in graces) + SHUTDOWN_MARGIN_S
    for template in _pod_templates(cluster):
        # Kubernetes' default is 30 s: SIGKILL before the workers' checkpoint is written.
        assert template["spec"].get("terminationGracePeriodSeconds", 30) >= needed, (name, template)
