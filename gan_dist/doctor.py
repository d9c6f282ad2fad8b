"""``gan-dist doctor``: check a Ray cluster from every node before a job is spent on it.

One Ray task per alive node (pinned to it, ``num_cpus=0`` so it runs on a busy node and on a 0-CPU head) reports
that node's versions, NVIDIA driver, GPUs, free disk, token auth, and whether the config's data, checkpoint
storage and tracking server answer from there, with the node's own credentials: they are read on the node, never
sent in a task's arguments or runtime env (docs/security.md). The driver compares versions across nodes and runs
one real collective across the worker group the job would start. Every result is a ``Check`` with a fix.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy
from rich.table import Table

from gan_dist import storage
from gan_dist.config import GanConfig
from gan_dist.tracking.redact import check_no_secrets, redact_text, redact_uri

OK, WARN, FAIL = "ok", "warn", "fail"
VERSIONS = ("python", "torch", "ray", "gan_dist")  # must be equal on every node
# The oldest Linux driver each CUDA major version runs on (CUDA toolkit release notes, minor-version compatibility).
MIN_DRIVER = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}
DISK_FAIL_GB, DISK_WARN_GB = 2, 20
COLLECTIVE_MB = 32
PROBE_TIMEOUT_S = 180  # a node that imports torch and mlflow on a busy CPU takes a while
PLACEMENT_TIMEOUT_S = 60
SAME_EVERYWHERE = "install the same version on every node (one image: cluster/versions.yaml)"


class ClusterUnreachable(Exception):
    """The cluster cannot be joined (no answer, or the token refused); the message is one line with the fix."""


@dataclass
class Check:
    node: str
    name: str
    status: str
    detail: str
    fix: str = ""


# ---- on each node -------------------------------------------------------------------------------------


def _versions() -> list[Check]:
    import torch

    # What the node's own Python has installed, as a `python -m gan_dist` there finds it: in a fresh interpreter,
    # since Ray puts the driver's sys.path (and the package a job ships) in front of this worker's.
    find = "import importlib.metadata as m; print(m.version('gan_dist'))"
    found = subprocess.run([sys.executable, "-c", find], capture_output=True, text=True, timeout=60, cwd="/")
    ours = found.stdout.strip() if found.returncode == 0 else "not installed"
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    values = {"python": platform.python_version(), "torch": f"{torch.__version__} ({build})",
              "ray": ray.__version__, "gan_dist": ours}  # fmt: skip
    return [Check("", name, OK, value) for name, value in values.items()]


def _nvidia_smi() -> list[list[str]]:
    """One row per GPU (name, MiB, compute capability, driver); none without a driver. NVML ignores
    CUDA_VISIBLE_DEVICES, which Ray empties for this GPU-less task, so every GPU of the node shows."""
    query = "--query-gpu=name,memory.total,compute_cap,driver_version"
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [[field.strip() for field in line.split(",")] for line in out.strip().splitlines()]


def _gpu_checks(use_gpu: bool) -> list[Check]:
    import torch

    gpus, cuda = _nvidia_smi(), torch.version.cuda
    needed = MIN_DRIVER.get((cuda or "").split(".")[0])
    wheel = "install torch's CUDA wheel for the driver (README, GPU nodes; cluster/versions.yaml torch_index)"
    if not gpus:
        status = FAIL if use_gpu else OK
        return [Check("", "nvidia driver", status, "none" + ("" if use_gpu else " (CPU job)"),
                      f"install an NVIDIA driver >= {needed or MIN_DRIVER['13']}" if use_gpu else ""),
                Check("", "gpus", status, "none", "a GPU job needs GPU nodes" if use_gpu else "")]  # fmt: skip
    driver = gpus[0][3]
    if not cuda:
        drivers = Check("", "nvidia driver", FAIL if use_gpu else WARN, f"{driver}, but torch is a CPU build", wheel)
    elif _numbers(driver) < _numbers(needed or "0"):
        drivers = Check("", "nvidia driver", FAIL, f"{driver} < {needed}, which torch's CUDA {cuda} needs",
                        f"upgrade the driver to >= {needed}, or {wheel}")  # fmt: skip
    else:
        drivers = Check("", "nvidia driver", OK, f"{driver} (CUDA {cuda} needs >= {needed})")
    kinds = Counter(f"{name} {int(mib) / 1024:.0f} GiB{', bf16' if _numbers(cap) >= (8,) else ', no bf16'}"
                    for name, mib, cap, _ in gpus)  # fmt: skip
    no_bf16 = any(_numbers(cap) < (8,) for _, _, cap, _ in gpus)
    seen = ", ".join(f"{n} × {kind}" for kind, n in kinds.items())
    return [drivers, Check("", "gpus", WARN if no_bf16 else OK, seen,
                           "bf16 needs compute capability >= 8.0: train.precision=fp16 or fp32" if no_bf16 else "")]


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _disk_checks() -> list[Check]:
    places = {"disk: object spilling": ray.get_runtime_context().get_temp_dir(),
              "disk: checkpoint staging": tempfile.gettempdir()}  # fmt: skip
    checks = []
    for name, path in places.items():
        free = shutil.disk_usage(path).free / 2**30
        status = FAIL if free < DISK_FAIL_GB else WARN if free < DISK_WARN_GB else OK
        fix = f"free space on {path}'s filesystem or point it at a bigger disk" if status != OK else ""
        checks.append(Check("", name, status, f"{free:.0f} GiB free in {path}", fix))
    return checks


def _token_check() -> Check:
    from ray._raylet import AuthenticationTokenLoader

    fix = "start Ray on every node with RAY_AUTH_MODE=token and the cluster's token (docs/security.md)"
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return Check("", "auth token", FAIL, "Ray runs here without token auth: whoever reaches it runs code", fix)
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return Check("", "auth token", FAIL, "token auth on, but no token found", fix)
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and not os.environ.get("RAY_AUTH_TOKEN") and os.stat(path).st_mode & 0o077:
        return Check("", "auth token", FAIL, f"the token file {path} is open to other users", f"chmod 600 {path}")
    return Check("", "auth token", OK, "token auth on")


def _reached(name: str, target: str, fn: Any, fix: str) -> Check:
    """``fn()`` returns a detail; any exception is this node's failure to reach ``target``, in one line."""
    try:
        return Check("", name, OK, fn())
    except Exception as exc:  # whatever the store or server says: reported, never raised
        why = redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        target = redact_text(target)
        return Check("", name, FAIL, why if target in why else f"{target}: {why}", fix)


def _roundtrip(base: str, cfg: GanConfig, node_id: str) -> str:
    url = storage.join(base, f".gan_dist_doctor/{node_id[:12]}-{secrets.token_hex(4)}")
    payload = secrets.token_bytes(64)
    storage.write_bytes(url, payload, cfg.storage)
    try:
        if storage.read_bytes(url, cfg.storage) != payload:
            raise OSError("read back different bytes than written")
    finally:
        storage.delete(url, cfg.storage)
    return f"{base}: write, read back, delete"


def _data(cfg: GanConfig) -> str:
    from gan_dist.data.shards import list_shards

    shards = list_shards(cfg.data.url, cfg.storage)
    if not shards or not storage.exists(shards[0], cfg.storage):
        raise OSError("no shard found")
    return f"{cfg.data.url}: {len(shards)} shards listed, the first one found"


def _tracking(uri: str) -> str:
    """An authenticated API call with this node's MLflow credentials (environment or ~/.mlflow/credentials),
    bounded in time: MLflow's own client retries an unreachable server for minutes."""
    import urllib3
    from mlflow.utils.credentials import read_mlflow_creds

    scheme = uri.split("://")[0] if "://" in uri else "file"
    if scheme not in ("http", "https"):
        return f"{redact_uri(uri)}: a local {scheme} store, written where rank 0 runs"
    creds = read_mlflow_creds()
    headers = urllib3.make_headers(basic_auth=f"{creds.username}:{creds.password}") if creds.username else {}
    if getattr(creds, "token", None):
        headers = {"Authorization": f"Bearer {creds.token}"}
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    answer = urllib3.PoolManager().request("GET", url, headers=headers, retries=False, timeout=10)
    if answer.status in (401, 403):
        raise PermissionError(f"HTTP {answer.status}: this node's MLflow credentials were refused")
    if answer.status >= 400:
        raise OSError(f"HTTP {answer.status}")
    return f"{redact_uri(uri)}: answered"


def probe_node(cfg_tree: dict[str, Any], check_data: bool) -> list[dict[str, Any]]:
    """Every per-node check, run on the node itself (``cfg_tree``: the job config, which holds no secret)."""
    cfg = GanConfig.model_validate(cfg_tree)
    node_id = ray.get_runtime_context().get_node_id()
    reach = "check {}, storage.endpoint_url, and this node's AWS_* credentials and network"
    tracking = "start the server or fix tracking.uri; check this node's MLFLOW_TRACKING_* credentials and network"
    checks = [*_versions(), *_gpu_checks(cfg.scaling.use_gpu), *_disk_checks(), _token_check(),
              _reached("checkpoint storage", cfg.checkpoint.storage, lambda: _roundtrip(cfg.checkpoint.storage, cfg,
                       node_id), reach.format("checkpoint.storage")),
              _reached("tracking server", redact_uri(cfg.tracking.uri), lambda: _tracking(cfg.tracking.uri), tracking)]
    if check_data:
        checks.append(_reached("data", cfg.data.url, lambda: _data(cfg), reach.format("data.url")))
    return [asdict(check) for check in checks]


# ---- on the driver ------------------------------------------------------------------------------------


def node_label(node: dict[str, Any]) -> str:
    head = " (head)" if "node:__internal_head__" in node["Resources"] else ""
    return f"{node['NodeManagerAddress']} {node['NodeID'][:8]}{head}"


def probe_nodes(cfg: GanConfig, check_data: bool) -> list[Check]:
    """``probe_node`` on every alive node, in parallel; a node that does not answer fails with its name."""
    nodes = {node["NodeID"]: node_label(node) for node in ray.nodes() if node["Alive"]}
    probe = ray.remote(num_cpus=0, max_retries=0)(probe_node)
    pending = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
               .remote(cfg.model_dump(mode="json"), check_data): node_id for node_id in nodes}  # fmt: skip
    done, late = ray.wait(list(pending), num_returns=len(pending), timeout=PROBE_TIMEOUT_S)
    checks = []
    for ref in done:
        label = nodes[pending[ref]]
        try:
            checks += [Check(**{**found, "node": label}) for found in ray.get(ref)]
        except ray.exceptions.RayError as exc:
            checks.append(Check(label, "node", FAIL, str(exc).strip().splitlines()[-1],
                                "see the node's Ray logs (raylet.out, python-core-worker-*.log)"))  # fmt: skip
    for ref in late:
        ray.cancel(ref, force=True)
        checks.append(Check(nodes[pending[ref]], "node", FAIL, f"no answer in {PROBE_TIMEOUT_S}s",
                            "the node is overloaded or its raylet is stuck: see its Ray logs"))  # fmt: skip
    return checks


def compare_versions(checks: list[Check]) -> list[Check]:
    """The version rows, each failed on the nodes whose value differs from the most common one."""
    for name in VERSIONS:
        rows = [c for c in checks if c.name == name]
        common, _ = Counter(c.detail for c in rows).most_common(1)[0] if rows else ("", 0)
        for row in rows:
            if row.detail != common:
                row.status, row.fix = FAIL, f"{SAME_EVERYWHERE}: the other nodes have {common}"
    return checks


class _Rank:
    """One worker of the doctor's collective: where the job's worker would be, with its resources."""

    def __init__(self, rank: int, world: int, backend: str) -> None:
        self.rank, self.world, self.backend = rank, world, backend

    def endpoint(self) -> tuple[str, int]:
        with socket.socket() as s:  # rank 0's rendezvous port, picked free on its own node
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def all_reduce(self, master: tuple[str, int], nbytes: int, rounds: int) -> float:
        """Seconds for ``rounds`` all_reduces of ``nbytes``, after a warm-up; fails on a wrong sum."""
        import torch
        import torch.distributed as dist

        dist.init_process_group(self.backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=self.rank,
                                world_size=self.world, timeout=timedelta(seconds=60))  # fmt: skip
        try:
            device = "cuda" if self.backend == "nccl" else "cpu"
            tensor = torch.ones(nbytes // 4, device=device)
            dist.all_reduce(tensor)
            (torch.cuda.synchronize() if device == "cuda" else None)
            start = time.perf_counter()
            for _ in range(rounds):
                dist.all_reduce(tensor)
            (torch.cuda.synchronize() if device == "cuda" else None)
            elapsed = time.perf_counter() - start
            # world ** (rounds + 1) passes float32's exact integers (2**24) from 17 ranks on: check one fresh sum
            tensor.fill_(1.0)
            dist.all_reduce(tensor)
            if tensor[0].item() != float(self.world):
                raise RuntimeError(f"all_reduce of ones summed to {tensor[0].item()}, not {self.world}")
            return elapsed
        finally:
            dist.destroy_process_group()


def collective(cfg: GanConfig, rounds: int = 5) -> Check:
    """A timed all_reduce across as many workers as the job starts, each with a job worker's resources, placed
    as Ray Train places them (one PACK placement group); reports the bus bandwidth (as nccl-tests count it)."""
    world, use_gpu = cfg.scaling.max_workers, cfg.scaling.use_gpu
    backend = "nccl" if use_gpu else "gloo"
    bundle = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    name = f"collective ({backend})"
    group = placement_group([bundle] * world, strategy="PACK")
    try:
        if not group.wait(PLACEMENT_TIMEOUT_S):
            return Check("cluster", name, FAIL, f"no room for {world} workers × {bundle} in {PLACEMENT_TIMEOUT_S}s",
                         "add nodes, stop other jobs, or lower scaling.num_workers / scaling.cpus_per_worker")
        actor = ray.remote(_Rank)
        ranks = [actor.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), scheduling_strategy=
                               PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank))
                 .remote(rank, world, backend) for rank in range(world)]  # fmt: skip
        nbytes = COLLECTIVE_MB << 20
        master = ray.get(ranks[0].endpoint.remote(), timeout=PROBE_TIMEOUT_S)
        elapsed = max(ray.get([r.all_reduce.remote(master, nbytes, rounds) for r in ranks], timeout=PROBE_TIMEOUT_S))
    except (ray.exceptions.RayError, TimeoutError) as exc:
        return Check("cluster", name, FAIL, str(exc).strip().splitlines()[-1],
                     "the workers' nodes must reach each other on every port (firewall, security group); for NCCL "
                     "see NCCL_SOCKET_IFNAME and NCCL_DEBUG=INFO in the workers' log")  # fmt: skip
    finally:
        remove_placement_group(group)
    bus = nbytes * rounds * 2 * (world - 1) / world / elapsed / 1e9
    detail = f"{COLLECTIVE_MB} MB all_reduce across {world} workers: {bus:.2f} GB/s bus bandwidth"
    return Check("cluster", name, OK, detail)


def render(checks: list[Check]) -> tuple[Table, list[str]]:
    """The node × check table, and one line per failure naming its node and its fix."""
    marks = {OK: "[green]✓[/]", WARN: "[yellow]![/]", FAIL: "[red]✗[/]"}
    table = Table(title="gan-dist doctor", title_justify="left", expand=False)
    for column in ("node", "check", "", "detail"):
        table.add_column(column, overflow="fold")
    for check in sorted(checks, key=lambda c: c.node):
        table.add_row(check.node, check.name, marks[check.status], check.detail)
    fixes = [f"✗ {c.node} · {c.name}: {c.detail} — fix: {c.fix}" for c in checks if c.status == FAIL]
    fixes += [f"! {c.node} · {c.name}: {c.detail} — {c.fix}" for c in checks if c.status == WARN and c.fix]
    return table, fixes


def job_check(cfg: GanConfig, address: str | None) -> Check:
    """The checks ``train`` runs on the driver (the job against its dataset, no secret in the config)."""
    from gan_dist.config import ConfigError
    from gan_dist.driver import preflight

    try:
        plan = preflight(cfg, address)
    except (ConfigError, ValueError) as exc:
        return Check("driver", "job vs data", FAIL, str(exc), "change the config key the message names")
    return Check("driver", "job vs data", OK, f"{sum(plan.counts)} images in {len(plan.shards)} shards feed "
                 f"{cfg.scaling.max_workers} workers")  # fmt: skip


def check_access(address: str) -> None:
    """ClusterUnreachable, in one line, for a cluster that does not answer or refuses this token: ``ray.init``
    would retry for a while and then report either one as the same ConnectionError."""
    from ray._raylet import AuthenticationTokenLoader, GcsClient
    from ray.exceptions import AuthenticationError

    from gan_dist.driver import RunError, _check_cluster

    try:
        _check_cluster(address)
        with _stderr_closed():  # Ray's C++ client logs the refusal too: it is said once, below
            GcsClient(address=address)  # fetches the cluster id: the first call the token must pass
    except RunError as exc:
        raise ClusterUnreachable(f"{exc.what}: {exc.message}") from None
    except AuthenticationError:
        found = AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
        problem = "rejected the token (not this cluster's)" if found else "requires a token and none was found"
        if found and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            problem = "requires a token, and RAY_AUTH_MODE here is not 'token', so none was sent"
        raise ClusterUnreachable(f"the Ray cluster at {address} {problem}: set RAY_AUTH_TOKEN_PATH to the cluster's "
                                 "token file (or RAY_AUTH_TOKEN) and RAY_AUTH_MODE=token (docs/security.md)") from None


@contextmanager
def _stderr_closed() -> Iterator[None]:
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def diagnose(cfg: GanConfig, address: str | None, with_job: bool) -> list[Check]:
    """Every check; ``with_job``: a CONFIG was given, so also the job against its data, from every node too.
    Joins the cluster as ``train`` does (``driver.connect``), so the checks run where the job's code runs."""
    from gan_dist.driver import connect

    check_no_secrets(cfg)  # the config goes to every node as the probes' argument, which Ray keeps
    checks = [job_check(cfg, address)] if with_job else []
    if address is not None and "://" not in address and address != "auto":
        check_access(address)
    connect(address)
    checks += compare_versions(probe_nodes(cfg, with_job))
    checks.append(collective(cfg))
    return checks
