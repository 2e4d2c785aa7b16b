"""The GCP cluster configs and the Colab notebook, checked offline.

The cluster files go through Ray's own config pipeline the way `ray up` runs it before it talks
to GCP (prepare_config merges gcp/defaults.yaml, then validate_config applies ray-schema.json);
the provider bootstrap that follows needs credentials and network and is not run here. The
rest are the rules that keep a run alive on machines that vanish: no training on the head,
preemptible workers that can write run storage, pinned installs, a notebook whose commands
name real recipe fields.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement

REPO = Path(__file__).resolve().parents[1]
AUTOSCALER_ACCOUNT = "ray-autoscaler-sa-v1@"  # Ray's own: roles/owner-like, given to the head
WORKER_ACCOUNT = "orchestrator-worker@YOUR_GCP_PROJECT.iam.gserviceaccount.com"
# A commit, or the placeholder the docs tell users to replace with one (never a movable tag or branch).
COMMIT = r"(?:[0-9a-f]{40}|YOUR_COMMIT_SHA)"
GPU_CONFIG = REPO / "ray_cluster.yaml"
TPU_CONFIG = REPO / "ray_cluster.tpu.yaml"
NOTEBOOK = REPO / "notebooks" / "colab_quickstart.ipynb"
CONFIGS = [GPU_CONFIG, TPU_CONFIG]

# GPUs that come with an accelerator-optimized machine type (no guestAccelerators needed).
BUILT_IN_GPUS = {r"a2-highgpu-(\d+)g": None, r"a2-ultragpu-(\d+)g": None, r"g2-standard-\d+": 1}
GCS_WRITE_SCOPES = {
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/devstorage.full_control",
}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_version(package: str) -> str:
    """The exact version constraints.txt pins a dependency to (`name==X`): what CI tests, and what
    every cluster node must run. pyproject.toml itself declares ranges."""
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.name.lower() == package.lower():
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt should pin {package} exactly, has {line}"
            return spec.version
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def head(config: dict[str, Any]) -> dict[str, Any]:
    return config["available_node_types"][config["head_node_type"]]


def workers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def all_commands(config: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    cmds = [c for k in keys for c in config.get(k) or []]
    for node_type in config["available_node_types"].values():
        cmds += node_type.get("initialization_commands", []) + node_type.get("worker_setup_commands", [])
    return cmds


def install_requirements(config: dict[str, Any]) -> list[str]:
    """Every requirement that a `pip install` / `uv pip install` in the setup commands names."""
    reqs = []
    for cmd in all_commands(config):
        tokens = shlex.split(cmd)
        for i in range(len(tokens) - 1):
            if tokens[i] == "pip" and tokens[i + 1] == "install":
                args = tokens[i + 2 :]
                skip_next = False
                for tok in args:
                    if tok in ("&&", "||", ";", "|"):
                        break
                    if skip_next:
                        skip_next = False
                        continue
                    if tok in ("--python", "-r", "-c", "--index-url", "--extra-index-url", "-f"):
                        skip_next = True
                        continue
                    if not tok.startswith("-"):
                        reqs.append(tok)
    return reqs


def network_tags(node: dict[str, Any]) -> list[str]:
    """GCE writes tags as {items: [...]}, the TPU API as a list."""
    tags = node.get("tags") or []
    return tags.get("items", []) if isinstance(tags, dict) else tags


def is_spot(scheduling: dict[str, Any]) -> bool:
    return scheduling.get("preemptible") is True or scheduling.get("provisioningModel") == "SPOT"


# ---------------------------------------------------------------- both cluster files


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cluster_config_passes_rays_own_schema_as_ray_up_prepares_it(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(path)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # raises on any schema violation
    # What we wrote survives Ray's merge with gcp/defaults.yaml (top-level keys replace defaults).
    assert prepared["available_node_types"].keys() == raw["available_node_types"].keys()
    assert prepared["head_node_type"] == raw["head_node_type"]
    assert prepared["provider"]["type"] == "gcp"
    assert prepared["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_project_placeholders_are_marked_not_guessed(path):
    config = load(path)
    assert config["provider"]["project_id"] == "YOUR_GCP_PROJECT"
    assert config["provider"]["availability_zone"].startswith(config["provider"]["region"] + "-")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_head_node_is_not_preemptible_and_takes_no_training(path):
    config = load(path)
    h = head(config)
    # Ray starts the head with these resources (RAY_OVERRIDE_RESOURCES): CPU 0 means no Ray
    # Train worker, which asks for CPU (and GPU), can ever be placed there.
    assert h["resources"].get("CPU") == 0
    assert not {k: v for k, v in h["resources"].items() if k != "CPU" and v}, "the head must advertise no accelerator"
    assert h.get("min_workers", 0) == 0 and h.get("max_workers") == 0
    node = h["node_config"]
    assert "machineType" in node and "guestAccelerators" not in node
    assert "acceleratorType" not in node and "acceleratorConfig" not in node, "TPUs cannot be heads"
    scheduling = node.get("scheduling", {})
    assert isinstance(scheduling, dict), "GCE's scheduling is an object (ray-project/ray#46248)"
    assert not is_spot(scheduling), "the head must be on-demand: losing it loses the driver and the autoscaler"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_head_state_outlives_the_head(path):
    """Run state on GCS, MLflow's DB on a kept disk, MLflow's artifacts on GCS."""
    config = load(path)
    start = " ".join(config["head_start_ray_commands"])
    db = re.search(r"--backend-store-uri sqlite:////(\S+)", start)
    assert db, "the head should run the MLflow server every node writes to"
    kept = [d for d in head(config)["node_config"]["disks"] if not d.get("boot") and d.get("autoDelete") is False]
    assert len(kept) == 1 and kept[0].get(
        "source"), "the MLflow DB needs an existing disk that is not deleted with the head"
    device = f"/dev/disk/by-id/google-{kept[0]['deviceName']}"
    mount = re.search(rf"mount -o \S+ {re.escape(device)} ([^\s)]+)", start)
    assert mount, f"{device} should be mounted by the head's start commands"
    assert ("/" + db.group(1)).startswith(mount.group(1) + "/")
    assert re.search(r"--artifacts-destination gs://\S+", start)
    # Listening on the VPC is only safe behind authentication (tests/test_cluster_auth.py starts it).
    assert "--app-name basic-auth" in start


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_worker_is_preemptible_and_can_write_run_storage(path):
    config = load(path)
    assert workers(config)
    for name, w in workers(config).items():
        node = w["node_config"]
        assert w.get("min_workers", 0) == 0, f"{name}: no idle preemptible workers kept around"
        assert w.get("max_workers", 0) >= 1, name
        if "machineType" in node:  # a Compute Engine VM
            scheduling = node.get("scheduling")
            assert isinstance(scheduling, dict), f"{name}: GCE's scheduling is an object (ray-project/ray#46248)"
            assert is_spot(scheduling), f"{name}: GPU workers should be Spot/preemptible"
            assert scheduling.get("onHostMaintenance") == "TERMINATE", f"{name}: GPU VMs cannot live-migrate"
            assert scheduling.get("automaticRestart") is False, f"{name}: Spot VMs cannot restart themselves"
        else:  # a TPU VM: the TPU API's schedulingConfig
            sc = node.get("schedulingConfig", {})
            assert sc.get("preemptible") is True or sc.get("spot") is True, f"{name}: TPU workers should be preemptible"
        # Ray gives its service account to the head only; a worker left on the default
        # compute account has read-only storage scope and cannot write checkpoints to GCS.
        accounts = node.get("serviceAccounts") or []
        assert accounts and set(
            accounts[0]["scopes"]) & GCS_WRITE_SCOPES, f"{name}: needs a GCS-writable service account"
        # Least privilege: the autoscaler's project-wide account stays on the head.
        assert not any(a["email"].startswith(AUTOSCALER_ACCOUNT) for a in accounts), f"{name}: runs as the autoscaler"
        assert accounts[0]["email"] == WORKER_ACCOUNT, name
        assert "orchestrator" in network_tags(node), f"{name}: the firewall rules admit the cluster's tag only"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_setup_commands_pin_the_project_by_commit_and_ray_and_torch_as_constraints_do(path):
    config = load(path)
    reqs = install_requirements(config)
    assert reqs, "setup commands should install the project"
    names = {}
    for spec in reqs:
        try:
            req = Requirement(spec)
        except InvalidRequirement:
            pytest.fail(f"{spec!r} is not a requirement")
        names[req.name] = req
        pinned = req.url is not None or any(s.operator == "==" for s in req.specifier)
        assert pinned, f"unpinned install {spec!r}: every node and every replacement must run the same code"
    project = names.get("orchestrator")
    assert project is not None, "setup commands should install orchestrator"
    # A commit, not a release tag: a tag can be moved, and a worker re-created mid-run must match the head.
    assert project.url and re.search(rf"@{COMMIT}$", project.url), f"{project} should be pinned to a commit"
    assert not re.search(r"pip install\s+(-\S+\s+)*['\"]?orchestrator['\"]?(\s|$)", " ".join(all_commands(config)))
    for dep in ("ray", "torch"):
        assert dep in names, f"setup commands should pin {dep}"
        assert str(names[dep].specifier) == f"=={pinned_version(dep)}", f"{dep} differs from pyproject.toml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_install_uses_the_constraints_of_the_commit_it_installs(path):
    """A worker re-created mid-run installs exactly the head's packages: every pip line is bound by
    constraints.txt, fetched from the same commit as the project; uv comes from PyPI, not curl | sh."""
    config = load(path)
    cmds = all_commands(config)
    installs = [c for c in cmds if re.search(r"\bpip install\b", c)]
    assert installs
    for cmd in installs:
        assert re.search(r"(^|\s)-c ~/constraints\.txt(\s|$)", cmd), f"{cmd!r}: install without the constraints"
    fetch = [c for c in cmds if "constraints.txt" in c and "curl" in c]
    assert len(fetch) == 1, "constraints.txt should be fetched once"
    commit = re.search(rf"/orchestrator/({COMMIT})/constraints\.txt", fetch[0])
    project = next(Requirement(r) for r in install_requirements(config) if Requirement(r).name == "orchestrator")
    assert commit and project.url.endswith("@" + commit.group(1)), "constraints and project from different commits"
    assert cmds.index(fetch[0]) < min(cmds.index(c) for c in installs)
    assert not any(re.search(r"\|\s*(ba)?sh\b", c) for c in cmds), "no curl | sh"
    uv = [r for r in install_requirements(config) if Requirement(r).name == "uv"]
    assert uv == [f"uv=={pinned_version('uv')}"]
    assert all("--python-preference only-managed" in c for c in cmds if "uv venv" in c), "the image's Python varies"
    # The pins cover what the head adds: mlflow[auth]'s Flask-WTF and the autoscaler's GCP client.
    for dep in ("Flask-WTF", "WTForms", "google-api-python-client", "httplib2"):
        pinned_version(dep)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_node_starts_ray_with_token_auth_and_the_dashboard_on_loopback(path):
    config = load(path)
    mounts = config["file_mounts"]
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token", "the token made once on your machine"
    assert "~/.orchestrator/mlflow_password" in mounts
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert len(starts) == 1, key
        assert "export RAY_AUTH_MODE=token" in starts[0], f"{key}: Ray without token auth"
        assert 'RAY_AUTH_TOKEN_PATH="$HOME/.ray/auth_token"' in starts[0], key
        assert "MLFLOW_TRACKING_PASSWORD=\"$(cat ~/.orchestrator/mlflow_password)\"" in starts[0], key
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--dashboard-host=0.0.0.0" not in head_start
    # No secret on a command line or in the file: only the paths of files that hold them.
    text = path.read_text()
    assert not re.search(r"(RAY_AUTH_TOKEN|MLFLOW_TRACKING_PASSWORD|MLFLOW_AUTH_ADMIN_PASSWORD)=[^\"$\s]", text)


def test_local_ray_matches_the_cluster_ray():
    """`ray up` from this environment drives a cluster running the same Ray."""
    import ray

    assert ray.__version__ == pinned_version("ray")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_start_commands_follow_rays_examples(path):
    config = load(path)
    head_start = " ".join(config["head_start_ray_commands"])
    for flag in ("ray start", "--head", "--port=6379", "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        assert flag in head_start
    assert config["head_start_ray_commands"][0] == "ray stop"
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])
    assert config.get("idle_timeout_minutes", 0) > 0
    assert config["max_workers"] >= 1


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_command_is_valid_bash(path):
    for cmd in all_commands(load(path)):
        res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"{cmd!r}: {res.stderr}"


# ---------------------------------------------------------------- GPU cluster


def gpus_attached(node: dict[str, Any]) -> int:
    count = sum(int(a.get("acceleratorCount", 0)) for a in node.get("guestAccelerators", []))
    for pattern, fixed in BUILT_IN_GPUS.items():
        m = re.fullmatch(pattern, node["machineType"])
        if m:
            count += fixed if fixed is not None else int(m.group(1))
    return count


def test_gpu_workers_are_t4_l4_a100_and_advertise_the_gpus_they_have():
    config = load(GPU_CONFIG)
    kinds = set()
    for name, w in workers(config).items():
        node = w["node_config"]
        attached = gpus_attached(node)
        assert attached >= 1, f"{name}: no GPU attached"
        # The autoscaler launches a node type for the resources it says it has.
        assert w["resources"].get("GPU") == attached, f"{name}: advertises {w['resources']} but has {attached} GPU(s)"
        kinds |= {a["acceleratorType"] for a in node.get("guestAccelerators", [])}
        kinds.add(node["machineType"].split("-")[0])
    assert {"nvidia-tesla-t4", "g2", "a2"} <= kinds


def test_gpu_workers_fit_the_reference_recipe():
    """Ray Train asks for {CPU: cpus_per_worker, GPU: 1} per worker; a node type that cannot hold
    that bundle is never launched for it, and the run waits forever."""
    from common.recipe import load_recipe

    ex = load_recipe(str(REPO / "recipes" / "unet224.yaml")).execution
    assert ex.use_gpu
    for name, w in workers(load(GPU_CONFIG)).items():
        assert w["resources"]["CPU"] >= ex.cpus_per_worker, f"{name}: fewer CPUs than unet224 asks per worker"
        assert w["resources"]["GPU"] >= 1, name


# ---------------------------------------------------------------- TPU cluster


def test_tpu_cluster_has_no_tpu_on_the_head_and_tpu_workers_ray_can_launch():
    from ray._private.accelerators import TPUAcceleratorManager, tpu

    config = load(TPU_CONFIG)
    assert "TPU" not in head(config)["resources"]
    tpu_workers = {k: w for k, w in workers(config).items() if "acceleratorType" in w["node_config"]}
    assert tpu_workers
    for name, w in tpu_workers.items():
        node = w["node_config"]
        # Ray's rule (gcp/config.py get_node_type): acceleratorType and no machineType is a TPU VM.
        assert "machineType" not in node and node.get("runtimeVersion"), name
        acc = node["acceleratorType"]
        assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(acc), f"{name}: {acc}"
        chips = int(acc.split("-")[1]) // tpu.get_tpu_cores_per_chip(acc)
        assert chips <= tpu.get_num_tpu_visible_chips_per_host(acc), f"{name}: multi-host pods do not autoscale"
        assert w["resources"].get("TPU") == chips, f"{name}: {acc} has {chips} chips"
    assert "untested" in TPU_CONFIG.read_text().lower()


# ---------------------------------------------------------------- notebook


def notebook() -> dict[str, Any]:
    return json.loads(NOTEBOOK.read_text())


def notebook_shell_lines() -> list[str]:
    lines = []
    for cell in notebook()["cells"]:
        if cell["cell_type"] == "code":
            lines += [ln.strip()[1:] for ln in "".join(cell["source"]).splitlines() if ln.strip().startswith("!")]
    return lines


def orchestrator_commands(verb: str) -> list[list[str]]:
    """The arguments after `orchestrator VERB` in each shell line of the notebook."""
    found = []
    for line in notebook_shell_lines():
        tokens = shlex.split(line)
        for i in range(len(tokens) - 1):
            if Path(tokens[i]).name == "orchestrator" and tokens[i + 1] == verb:
                found.append(tokens[i + 2 :])
    return found


def option_values(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == option]


def test_notebook_is_nbformat4_with_no_outputs():
    nb = notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert {c["cell_type"] for c in nb["cells"]} <= {"markdown", "code", "raw"}
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[a-zA-Z0-9-_]{1,64}", i) for i in ids)
    for cell in nb["cells"]:
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], (str, list))
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {cell['id']} has outputs"
            # Valid Python once IPython's `!shell` and `%magic` lines are set aside.
            lines = "".join(cell["source"]).splitlines()
            py = [ln[: len(ln) - len(ln.lstrip())] + "pass" if ln.lstrip()[:1] in ("!", "%") else ln for ln in lines]
            compile("\n".join(py), f"cell {cell['id']}", "exec")
        else:
            assert "outputs" not in cell and "execution_count" not in cell
    try:  # the full schema check where nbformat is installed (it is not a project dependency)
        import nbformat
    except ImportError:
        return
    nbformat.validate(nbformat.reads(NOTEBOOK.read_text(), as_version=4))


def test_notebook_set_keys_name_real_recipe_fields():
    """Every `orchestrator run RECIPE --set k=v` in the notebook loads: unknown keys are refused
    by the recipe's strict models, so a typo here would fail the user's first cell."""
    from common.recipe import load_recipe

    runs = orchestrator_commands("run")
    assert {args[0] for args in runs} == {"recipes/quickstart.yaml", "recipes/unet224.yaml"}
    for args in runs:
        sets = option_values(args, "--set")
        assert sets, args
        rec = load_recipe(str(REPO / args[0]), sets)
        for item in sets:
            key, _, value = item.partition("=")
            node: Any = rec
            for part in key.split("."):
                node = getattr(node, part)
            assert str(node).lower() == value.lower(), f"--set {item} did not land on {key}"


def test_notebook_status_reads_the_storage_its_run_writes():
    """`status` defaults to ./runs; the notebook's runs write elsewhere, so each status call must
    pass the --storage of a run with that name."""
    from common.recipe import load_recipe

    written = set()
    for args in orchestrator_commands("run"):
        rec = load_recipe(str(REPO / args[0]), option_values(args, "--set"))
        written.add((rec.run.name, rec.run.storage))
    statuses = orchestrator_commands("status")
    assert len(statuses) >= 2
    for args in statuses:
        if option_values(args, "--address"):
            # Cluster mode: status finds the run's storage through its Ray job.
            assert args[0] in {name for name, _ in written}, args
        else:
            assert (args[0], option_values(args, "--storage")[0]) in written, args


def test_notebook_local_mode_keeps_run_on_drive_and_mlflow_on_local_disk_and_cluster_mode_uses_the_heads_mlflow():
    by_recipe = {args[0]: dict(s.partition("=")[::2] for s in option_values(args, "--set"))
                 for args in orchestrator_commands("run")}
    local = by_recipe["recipes/quickstart.yaml"]
    assert local["run.storage"].startswith("/content/drive/MyDrive/")
    # sqlite on Drive's FUSE mount is what SQLite warns against; the store stays on the VM's disk
    # and its copy goes to run storage with each checkpoint (workers/tracking_store.py).
    assert local["tracking.uri"].startswith("sqlite:////content/") and "/content/drive/" not in local["tracking.uri"]
    cluster = by_recipe["recipes/unet224.yaml"]
    assert cluster["run.storage"].startswith("gs://")
    ip = head(load(GPU_CONFIG))["node_config"]["networkInterfaces"][0]["networkIP"]
    assert cluster["tracking.uri"] == f"http://{ip}:5000", "the cluster's MLflow server is on the head's fixed IP"
    # Cluster mode submits a Ray job (the driver lives on the head), and returns at once.
    submits = [args for args in orchestrator_commands("run") if args[0] == "recipes/unet224.yaml"]
    assert submits and all(option_values(args, "--address") and "--detach" in args for args in submits)


def test_notebook_installs_are_pinned():
    version = pyproject()["project"]["version"]
    lines = notebook_shell_lines()
    clones = [ln for ln in lines if "git clone" in ln]
    assert clones and all(f"--branch v{version}" in ln for ln in clones)
    for line in lines:
        tokens = shlex.split(line)
        if "install" not in tokens or "pip" not in tokens:
            continue
        for tok in tokens[tokens.index("install") + 1 :]:
            if tok.startswith("-") or tok == ".":
                continue
            req = Requirement(tok)
            assert any(s.operator == "==" for s in req.specifier), f"unpinned install {tok!r} in the notebook"
            if req.name == "ray":
                assert str(req.specifier) == f"=={pinned_version('ray')}"
