"""The cluster/ deliverables hold together: manifests parse and name real things, the example spec loads, the image
pins what pyproject admits, the launcher config satisfies Ray's own schema, and start-local.sh really serves MLflow
from PostgreSQL.

Fast tests start nothing (no Ray, no network). The one marked `slow` runs cluster/mlflow/start-local.sh for real when
PostgreSQL's server binaries are installed (skipped otherwise, failed if STREAMSSL_REQUIRE_POSTGRES=1).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import tomllib
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
MLFLOW_DIR = CLUSTER / "mlflow"
START_LOCAL = MLFLOW_DIR / "start-local.sh"
LAUNCHER = CLUSTER / "ray-cluster.aws.yaml"
LAUNCHER_KEYS = {
    "cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "docker", "provider", "auth",
    "available_node_types", "head_node_type", "file_mounts", "setup_commands", "head_start_ray_commands",
    "worker_start_ray_commands",
}


def load_one(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path} should hold exactly one document"
    return docs[0]


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def gpu_count(container: dict, kind: str) -> int:
    return int(container.get("resources", {}).get(kind, {}).get("nvidia.com/gpu", 0))


def pyproject_requirement(name: str):
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml does not depend on {name}")


def allowed_host(patterns: str, host: str) -> bool:
    """MLflow's Host-header check (mlflow.server.security_utils.is_allowed_host_header): fnmatch where a pattern has
    '*', equality otherwise."""
    allowed = [p.strip() for p in patterns.split(",")]
    return "*" in allowed or any(fnmatch.fnmatch(host, p) if "*" in p else host == p for p in allowed)


def command_names() -> set[str]:
    import typer

    from cli.app import app

    return set(typer.main.get_command(app).commands)


# ---------------------------------------------------------------------------------------------------------- YAML


def test_every_yaml_under_cluster_parses_into_mappings():
    paths = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert {p.relative_to(CLUSTER).as_posix() for p in paths} >= {
        "ray-cluster.aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/spec-configmap.yaml",
        "mlflow/docker-compose.yaml", "mlflow/kubernetes.yaml",
    }
    for path in paths:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


# ------------------------------------------------------------------------------------------------------- KubeRay


# Field names of KubeRay's ray.io/v1 API types (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, RayJobSpec). The API
# server silently prunes unknown fields, so a misspelt one would simply not take effect.
RAY_CLUSTER_FIELDS = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                      "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs"}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                       "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
RAY_JOB_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                  "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
                  "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
                  "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert set(spec) <= RAY_CLUSTER_FIELDS, f"{where}: unknown fields {set(spec) - RAY_CLUSTER_FIELDS}"
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS, f"{where}: unknown headGroupSpec fields"
    assert all(set(w) <= WORKER_GROUP_FIELDS for w in spec["workerGroupSpecs"]), f"{where}: unknown worker fields"
    assert spec["enableInTreeAutoscaling"] is True, f"{where}: autoscaling must be on"
    head = spec["headGroupSpec"]
    workers = spec["workerGroupSpecs"]
    # KubeRay's rayStartParams is map[string]string: a bare YAML number or bool is rejected by the API server.
    for params in [head["rayStartParams"]] + [w["rayStartParams"] for w in workers]:
        assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"
    gpu_groups = [w for w in workers if any(gpu_count(c, "limits") >= 1 for c in containers(w["template"]))]
    assert gpu_groups, f"{where}: no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"] and group["maxReplicas"] >= 1
        for c in containers(group["template"]):
            assert gpu_count(c, "requests") == gpu_count(c, "limits") >= 1, f"{where}: GPU requests must equal limits"
    images = {c["image"] for c in containers(head["template"])}
    for w in workers:
        images |= {c["image"] for c in containers(w["template"])}
    assert len(images) == 1, f"{where}: head and workers must run the same image, got {images}"


def _config_mounts(pod_template: dict) -> dict[str, str]:
    """mountPath -> ConfigMap name for every ConfigMap volume the pod's containers mount."""
    volumes = {v["name"]: v["configMap"]["name"] for v in pod_template["spec"].get("volumes", []) if "configMap" in v}
    return {m["mountPath"]: volumes[m["name"]] for c in containers(pod_template)
            for m in c.get("volumeMounts", []) if m["name"] in volumes}


def test_raycluster_is_an_autoscaling_gpu_cluster_with_the_spec_mounted_on_the_head():
    doc = load_one(KUBERAY / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_ray_cluster_spec(doc["spec"], "raycluster.yaml")
    configmap = load_one(KUBERAY / "spec-configmap.yaml")
    assert _config_mounts(doc["spec"]["headGroupSpec"]["template"]).get("/config") == configmap["metadata"]["name"]


def test_rayjob_runs_a_real_streamssl_command_on_the_mounted_spec():
    doc = load_one(KUBERAY / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert set(spec) <= RAY_JOB_FIELDS, f"unknown RayJob fields {set(spec) - RAY_JOB_FIELDS}"
    assert spec["shutdownAfterJobFinishes"] is True
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    _check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")

    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "streamssl"
    assert argv[1] in command_names(), f"`streamssl {argv[1]}` is not a command"
    # The real CLI accepts the arguments (parsed only, nothing runs).
    import typer

    from cli.app import app

    ctx = typer.main.get_command(app).commands[argv[1]].make_context(argv[1], argv[2:])
    spec_path = Path(ctx.params["spec"])

    # The spec file the entrypoint names is a key of the ConfigMap mounted where the driver runs (the head pod).
    mounts = _config_mounts(spec["rayClusterSpec"]["headGroupSpec"]["template"])
    configmap = load_one(KUBERAY / "spec-configmap.yaml")
    assert mounts.get(str(spec_path.parent)) == configmap["metadata"]["name"]
    assert spec_path.name in configmap["data"]


def test_configmap_spec_loads_and_points_only_at_shared_urls(tmp_path):
    from orchestrator.spec.experiment import load_spec

    configmap = load_one(KUBERAY / "spec-configmap.yaml")
    assert configmap["kind"] == "ConfigMap"
    path = tmp_path / "spec.yaml"
    path.write_text(configmap["data"]["spec.yaml"])
    spec = load_spec(path)  # strict: an unknown field or bad value raises SpecError
    assert spec.data.url.startswith("s3://")
    assert spec.checkpoint_url.startswith("s3://")
    assert spec.tracking_uri == "http://mlflow:5000"
    assert spec.resources.gpus_per_worker == 1 and spec.resources.precision == "bf16"
    assert spec.data.synthetic is None  # nothing is generated on a node's local disk


def test_spec_tracking_uri_is_served_by_the_kubernetes_mlflow_service(tmp_path):
    from orchestrator.spec.experiment import load_spec

    configmap = load_one(KUBERAY / "spec-configmap.yaml")
    path = tmp_path / "spec.yaml"
    path.write_text(configmap["data"]["spec.yaml"])
    url = urlparse(load_spec(path).tracking_uri)

    docs = {d["kind"]: d for d in load_all(MLFLOW_DIR / "kubernetes.yaml")}
    service, deployment = docs["Service"], docs["Deployment"]
    assert service["metadata"]["name"] == url.hostname
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = containers(deployment["spec"]["template"])
    argv = container["command"] + container["args"]
    assert "--backend-store-uri" in argv and argv[argv.index("--backend-store-uri") + 1].startswith("postgresql")
    assert "--serve-artifacts" in argv
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    # MLflow rejects requests whose Host header it does not allow (403): the Service name must be allowed.
    assert allowed_host(env["MLFLOW_SERVER_ALLOWED_HOSTS"], url.netloc)


def test_compose_runs_mlflow_on_postgres_and_allows_its_service_name():
    compose = load_one(MLFLOW_DIR / "docker-compose.yaml")
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:15")
    mlflow = services["mlflow"]
    argv = mlflow["command"]
    assert argv[:2] == ["mlflow", "server"]
    assert argv[argv.index("--backend-store-uri") + 1].startswith("postgresql")
    assert "--serve-artifacts" in argv and "--artifacts-destination" in argv
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    default_hosts = re.fullmatch(r"\$\{MLFLOW_ALLOWED_HOSTS:-(.*)\}", mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"])
    assert default_hosts and allowed_host(default_hosts.group(1), "mlflow:5000")
    assert allowed_host(default_hosts.group(1), "localhost:5000")


# --------------------------------------------------------------------------------------------------- the image


def test_dockerfile_pins_torch_and_ray_that_pyproject_admits():
    text = (CLUSTER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", text, flags=re.MULTILINE))
    torch_req, vision_req = pyproject_requirement("torch"), pyproject_requirement("torchvision")
    assert args["TORCH_VERSION"] == "2.14.1" and torch_req.specifier.contains(args["TORCH_VERSION"])
    assert args["TORCHVISION_VERSION"] == "0.29.1" and vision_req.specifier.contains(args["TORCHVISION_VERSION"])
    image, tag = args["RAY_IMAGE"].split(":")
    assert image == "rayproject/ray" and "py311" in tag and "gpu" in tag
    assert pyproject_requirement("ray").specifier.contains(tag.split("-")[0])
    # The installs use those versions and add the cluster's clients.
    assert '"torch==${TORCH_VERSION}"' in text and '"torchvision==${TORCHVISION_VERSION}"' in text
    assert "boto3" in text and "psycopg2-binary" in text
    # The ignore file BuildKit reads for `-f cluster/Dockerfile` keeps the venv and run outputs out of the context.
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "streamssl-runs", "mlruns", ".git"} <= set(ignored)


def test_cluster_image_versions_agree_with_ray_version():
    tag = re.search(r"^ARG RAY_IMAGE=\S+:(\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE).group(1)
    ray_version = tag.split("-")[0]
    for name in ("raycluster.yaml", "rayjob.yaml"):
        doc = load_one(KUBERAY / name)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == ray_version, name


# ------------------------------------------------------------------------------------------ Ray cluster launcher


def test_launcher_config_has_the_required_keys_and_a_defined_head_type():
    config = load_one(LAUNCHER)
    assert LAUNCHER_KEYS <= set(config), f"missing: {sorted(LAUNCHER_KEYS - set(config))}"
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] and config["provider"]["availability_zone"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"], name
        assert "IamInstanceProfile" in node["node_config"], f"{name}: workers need an S3 role"
    assert config["docker"]["image"]
    assert any("--dashboard-host=0.0.0.0" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


def test_launcher_config_satisfies_rays_schema():
    """Ray validates a prepared config (its provider defaults merged in) against ray-schema.json; do the same from
    the installed package's files, without importing Ray."""
    import jsonschema  # installed with ray[default], a core dependency: a missing one must fail, not skip

    found = importlib.util.find_spec("ray")
    assert found is not None and found.submodule_search_locations, "ray is a core dependency"
    autoscaler = Path(list(found.submodule_search_locations)[0]) / "autoscaler"
    schema = json.loads((autoscaler / "ray-schema.json").read_text())
    config = load_one(LAUNCHER)
    merged = {**yaml.safe_load((autoscaler / "aws" / "defaults.yaml").read_text()), **config}
    jsonschema.validate(merged, schema)


# ------------------------------------------------------------------------------------------------ start-local.sh
# The script serving MLflow from PostgreSQL, its runs kept across a restart: tests/cluster/test_submit.py, on the
# cluster tests' own server (issue 23: one PostgreSQL and one `mlflow server` start for both).


def test_start_local_script_is_valid_bash():
    assert os.access(START_LOCAL, os.X_OK), "start-local.sh must be executable"
    result = subprocess.run(["bash", "-n", str(START_LOCAL)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
