"""Images match the wheels: cluster/versions.yaml declares one pairing of Ray base image, CUDA, torch wheel and the
NVIDIA driver they need, and the Dockerfile, the launcher YAMLs, the KubeRay manifests, pyproject.toml, the README
and the installed torch all agree with it. Offline: no Ray, no registry, no cloud."""

import re
import shlex
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
VERSIONS = yaml.safe_load((CLUSTER / "versions.yaml").read_text())
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
# NVIDIA's Linux driver floor per CUDA toolkit (CUDA Toolkit release notes, the CUDA Driver table). A pairing on
# another CUDA needs its floor looked up there and added.
DRIVER_FLOOR = {"12.6": "560.28.03", "13.0": "580.65.06"}


def _driver(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _nodot(text: str) -> str:
    return text.replace(".", "")


def _pip_install(command: str) -> tuple[dict[str, str], str | None]:
    """The name==version pins and the --index-url of a `pip install` command."""
    words = shlex.split(command)
    pins = dict(word.split("==", 1) for word in words if "==" in word)
    index = words[words.index("--index-url") + 1] if "--index-url" in words else None
    return pins, index


def _check_torch_install_first(commands: list[str], where: str) -> None:
    """The declared wheel, from the declared index, installed before the package (which would pull PyPI's build)."""
    torch_at = [i for i, c in enumerate(commands) if "pip install" in c and "torch==" in c]
    package_at = [i for i, c in enumerate(commands) if re.search(r"pip install .*-e /home/ray/gan_dist", c)]
    assert len(torch_at) == 1 and len(package_at) == 1, f"{where}: one torch and one package install: {commands}"
    pins, index = _pip_install(commands[torch_at[0]])
    assert pins == {"torch": VERSIONS["torch"], "torchvision": VERSIONS["torchvision"]}, f"{where}: {pins}"
    assert index == VERSIONS["torch_index"], f"{where}: torch comes from {index}, not {VERSIONS['torch_index']}"
    assert torch_at[0] < package_at[0], f"{where}: torch must be in place before `pip install -e` resolves it"


def test_base_image_tag_names_the_declared_ray_python_and_cuda():
    # Ray tags its CUDA images -cuXY (the -gpu alias is Ray's default CUDA, not necessarily the wheel's).
    v = VERSIONS
    assert v["base_image"] == f"rayproject/ray:{v['ray']}-py{_nodot(v['python'])}-cu{_nodot(v['cuda'])}"


def test_wheel_index_is_the_declared_cuda():
    assert VERSIONS["torch_index"] == f"https://download.pytorch.org/whl/cu{_nodot(VERSIONS['cuda'])}"


def test_min_driver_reaches_nvidias_floor_for_the_cuda():
    cuda = VERSIONS["cuda"]
    assert cuda in DRIVER_FLOOR, f"CUDA {cuda}: add NVIDIA's driver floor for it to DRIVER_FLOOR"
    assert _driver(VERSIONS["min_driver"]) >= _driver(DRIVER_FLOOR[cuda]), (VERSIONS["min_driver"], cuda)


def test_installed_torch_is_the_declared_build():
    import torch

    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU build: no CUDA to compare")
    assert Version(torch.__version__).base_version == VERSIONS["torch"], torch.__version__
    assert Version(installed_version("torchvision")).base_version == VERSIONS["torchvision"]
    # The CUDA `pip install -e .` brought in is the CUDA every image and index of the pairing is built for.
    assert ".".join(torch.version.cuda.split(".")[:2]) == VERSIONS["cuda"], torch.version.cuda


def _dependencies() -> dict[str, Requirement]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S)
    assert block, "pyproject.toml: no dependencies list"
    requirements = [Requirement(item) for item in re.findall(r'"([^"]+)"', block.group(1))]
    return {r.name: r for r in requirements}


def test_pyproject_pins_admit_the_pairing():
    deps = _dependencies()
    for name in ["ray", "torch", "torchvision"]:
        assert deps[name].specifier.contains(VERSIONS[name]), f"pyproject.toml's {deps[name]} excludes {VERSIONS[name]}"
    text = (ROOT / "pyproject.toml").read_text()
    package_version = re.search(r'^version = "([^"]+)"', text, re.M).group(1)
    assert VERSIONS["image"].endswith(f":{package_version}"), "the image is tagged with the package's version"


def test_dockerfile_builds_the_pairing():
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms == [VERSIONS["base_image"]], froms
    _check_torch_install_first(re.findall(r"^RUN (.*)$", text, re.M), "Dockerfile")
    assert f"-t {VERSIONS['image']} " in text, "the build command in the Dockerfile tags the image the manifests run"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_run_the_pairing(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    assert config["docker"]["image"] == VERSIONS["base_image"], name
    _check_torch_install_first(config["setup_commands"], name)


def test_aws_gpu_nodes_boot_the_declared_ami():
    # Ray's default AMI (Deep Learning AMI V71.0, CUDA 11.2) has a driver too old for any CUDA 13 container.
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue  # the CPU head starts no GPU container
        assert node_type["node_config"].get("ImageId") == VERSIONS["aws_ami"], node_type


def test_gcp_nodes_boot_the_declared_family_whose_driver_suffices():
    config = yaml.safe_load((CLUSTER / "gcp.yaml").read_text())
    family = VERSIONS["gcp_image_family"]
    expected = f"projects/deeplearning-platform-release/global/images/family/{family}"
    for name, node_type in config["available_node_types"].items():
        images = [d["initializeParams"]["sourceImage"] for d in node_type["node_config"]["disks"] if d.get("boot")]
        assert images == [expected], (name, images)
    branch = re.search(r"-nvidia-(\d+)$", family)
    assert branch, f"{family}: the family names no driver branch"
    assert int(branch.group(1)) >= _driver(VERSIONS["min_driver"])[0], f"{family} vs {VERSIONS['min_driver']}"


def _images(tree):
    if isinstance(tree, dict):
        yield from (v for k, v in tree.items() if k == "image")
        for child in tree.values():
            yield from _images(child)
    elif isinstance(tree, list):
        for child in tree:
            yield from _images(child)


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_runs_the_dockerfiles_image(name):
    manifest = yaml.safe_load((CLUSTER / name).read_text())
    images = list(_images(manifest))
    assert images and set(images) == {VERSIONS["image"]}, (name, images)
    ray_versions = re.findall(r"^\s*rayVersion: \"?([\d.]+)\"?$", (CLUSTER / name).read_text(), re.M)
    assert ray_versions == [VERSIONS["ray"]], (name, ray_versions)


def test_no_definition_names_another_base_image_or_wheel_index():
    # Comments included: a stale tag in a comment sends the reader to a build the files no longer run.
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text()
        for tag in re.findall(r"rayproject/ray:[\w.\-]+", text):
            assert tag == VERSIONS["base_image"], f"{path.name}: {tag}"
        for index in re.findall(r"https://download\.pytorch\.org/whl/\w+", text):
            assert index == VERSIONS["torch_index"], f"{path.name}: {index}"


@pytest.mark.parametrize("name", ["Dockerfile", *LAUNCHERS, *KUBERAY])
def test_every_definition_states_the_driver_its_gpu_nodes_need(name):
    assert f">= {VERSIONS['min_driver']}" in (CLUSTER / name).read_text(), name


def test_readme_says_which_driver_and_how_to_pick_another_build():
    text = (ROOT / "README.md").read_text()
    for fact in [VERSIONS["min_driver"], f"CUDA {VERSIONS['cuda']}", VERSIONS["torch_index"], "cluster/versions.yaml"]:
        assert fact in text, f"README.md does not say {fact}"
