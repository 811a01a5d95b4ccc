"""The Kubernetes manifests in deploy/k8s, checked without a cluster.

Every manifest, and every kustomization rendered (the base, the gpu and cpu overlays, the
examples), validates strictly against the Kubernetes API's JSON schemas: unknown fields and
wrong types fail, for the oldest and the newest Kubernetes in KUBERNETES_VERSIONS. The
schemas come with the kubernetes-validate package, which works offline. Rendering uses
tests/unit/k8s_render.py, a small renderer of the kustomize features deploy/k8s uses,
compared with `kubectl kustomize` where a kubectl is installed.

On top of the schema, the stack's rules: probes, resources and a drain configuration in
every workload, a PodDisruptionBudget each, an autoscaled gateway, headless Services for the
gRPC backends, a GPU only in the gpu overlay; and the cross-checks that keep the manifests
from drifting from the code: AERIE_* names are real settings, container and probe ports are
the services' ports, probe paths are the gateway's routes, images run the services'
Dockerfiles as their user, and docs/deploy.md's commands and metric names exist.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from .k8s_render import KUSTOMIZATION_FILE, RenderError, pod_spec, render, resource_id, split_image

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCS = ROOT / "docs" / "deploy.md"
COMPOSE = ROOT / "docker-compose.yml"
NAMESPACE = "aerie"

# The oldest Kubernetes the manifests support (native sidecar containers are on by default
# from 1.29) and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
VALIDATOR_INSTALL = "pip install kubernetes-validate"

# Manifests no kustomization lists: applied by hand (see their comments).
STANDALONE_MANIFESTS = [K8S / "secret.example.yaml"]
GPU_OVERLAY = K8S / "overlays" / "gpu"
OVERLAYS = ["overlays/gpu", "overlays/cpu"]

GRPC_SERVICES = ["verifier", "drafter", "memory"]
HTTP_SERVICES = ["gateway"]
AERIE_SERVICES = [*GRPC_SERVICES, *HTTP_SERVICES]
MODEL_SERVICES = ["verifier", "drafter", "memory"]  # mount the model cache, as in compose
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
GPU_RESOURCE = "nvidia.com/gpu"
# What a pod needs after its preStop sleep and drain to exit (Redis: to flush its AOF).
EXIT_MARGIN_S = 5

SETTINGS_CLASSES = [
    "aerie_common.settings.ServiceSettings",
    "aerie_common.settings.ModelSettings",
    "aerie_gateway.settings.GatewaySettings",
    "aerie_verifier.settings.VerifierSettings",
    "aerie_drafter.settings.DrafterSettings",
    "aerie_memory.settings.MemorySettings",
]


# --- what is there ---------------------------------------------------------------------------


def kustomization_dirs() -> list[str]:
    return sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob(KUSTOMIZATION_FILE))


RENDERINGS = kustomization_dirs()


def load_documents(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / KUSTOMIZATION_FILE).read_text()) or {}


def listed_files() -> tuple[set[Path], set[Path]]:
    """(resource files, patch files) that some kustomization lists."""
    resources, patches = set(), set()
    for name in RENDERINGS:
        directory = K8S / name
        spec = kustomization(directory)
        for entry in spec.get("resources", []):
            path = (directory / entry).resolve()
            if path.is_file():
                resources.add(path)
        for entry in spec.get("patches", []):
            if "path" in entry:
                patches.add((directory / entry["path"]).resolve())
    return resources, patches


def manifest_files() -> list[Path]:
    resources, _ = listed_files()
    return sorted(resources | set(STANDALONE_MANIFESTS))


def includes(directory: Path, target: Path) -> bool:
    """Whether rendering ``directory`` builds on the kustomization in ``target``."""
    if directory.resolve() == target.resolve():
        return True
    for entry in kustomization(directory).get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir() and includes(path, target):
            return True
    return False


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / name) for name in RENDERINGS}


def test_there_is_a_base_and_both_overlays():
    assert "base" in RENDERINGS
    for overlay in OVERLAYS:
        assert overlay in RENDERINGS
        assert includes(K8S / overlay, K8S / "base"), f"{overlay} must build on the base"


def test_every_yaml_file_is_a_kustomization_a_manifest_or_a_patch():
    """So that no manifest escapes validation by not being listed."""
    resources, patches = listed_files()
    known = resources | patches | {p.resolve() for p in STANDALONE_MANIFESTS}
    for path in K8S.rglob("*"):
        if path.is_dir():
            continue
        assert path.suffix == ".yaml", f"{path}: .yaml files only (the tests look for those)"
        if path.name != KUSTOMIZATION_FILE:
            assert path.resolve() in known, f"{path.relative_to(ROOT)} is in no kustomization"
    assert not resources & patches


# --- the Kubernetes API schemas ---------------------------------------------------------------


@pytest.fixture(scope="module")
def kubernetes_validate():
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        pytest.fail(f"kubernetes-validate is missing: `{VALIDATOR_INSTALL}` (it is in the dev extras)")


def schema_errors(kv, resource: dict, version: str) -> list[str]:
    """Why ``resource`` breaks the strict schema of Kubernetes ``version`` (none: it is valid)."""
    what = f"{resource.get('kind')}/{(resource.get('metadata') or {}).get('name')}"
    try:
        kv.validate(resource, version, strict=True)
    except kv.ValidationError as e:
        return [f"{what}: at {'.'.join(map(str, e.path)) or '(top)'}: {e.message}"]
    except kv.SchemaNotFoundError as e:
        return [f"{what}: {e.message}"]
    return []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_follows_the_api_schema(kubernetes_validate, path, version):
    documents = load_documents(path)
    assert documents, f"{path} is empty"
    errors = [e for d in documents for e in schema_errors(kubernetes_validate, d, version)]
    assert not errors, f"{path.relative_to(ROOT)} breaks Kubernetes {version}:\n  " + "\n  ".join(errors)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", RENDERINGS)
def test_rendering_follows_the_api_schema(kubernetes_validate, rendered, name, version):
    errors = [e for r in rendered[name] for e in schema_errors(kubernetes_validate, r, version)]
    assert not errors, f"{name} rendered breaks Kubernetes {version}:\n  " + "\n  ".join(errors)


def test_the_schema_is_strict(kubernetes_validate, rendered):
    """Misspelt fields, wrong types and named ports where numbers belong all fail."""
    kv = kubernetes_validate
    version = KUBERNETES_VERSIONS[-1]
    deployment = find(rendered["base"], "Deployment", "verifier")
    assert not schema_errors(kv, deployment, version)

    broken = json.loads(json.dumps(deployment))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert schema_errors(kv, broken, version)

    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    assert schema_errors(kv, broken, version)

    broken = json.loads(json.dumps(find(rendered["base"], "ConfigMap", "aerie-config")))
    broken["data"]["AERIE_DRAIN_TIMEOUT_S"] = 20
    assert schema_errors(kv, broken, version)

    assert schema_errors(kv, {"apiVersion": "v1", "kind": "Nonsense", "metadata": {"name": "x"}}, version)


# --- the renderer -----------------------------------------------------------------------------


def find_kubectl() -> str | None:
    beside_python = Path(sys.executable).parent / "kubectl"
    return str(beside_python) if beside_python.is_file() else shutil.which("kubectl")


@pytest.mark.parametrize("name", RENDERINGS)
def test_renderer_matches_kubectl_kustomize(name, rendered):
    kubectl = find_kubectl()
    if kubectl is None:
        pytest.skip("no kubectl here: the renderer is checked against `kubectl kustomize` where one is")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    theirs = {resource_id(r): r for r in yaml.safe_load_all(result.stdout) if r}
    ours = {resource_id(r): r for r in rendered[name]}
    assert sorted(ours) == sorted(theirs)
    for rid, resource in ours.items():
        assert resource == theirs[rid], f"{name}: {rid} renders differently from kubectl kustomize"


def write(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(document) if isinstance(document, list) else yaml.safe_dump(document))


def test_renderer_refuses_what_it_does_not_support(tmp_path):
    base = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "n"}}
    write(tmp_path / "c.yaml", config)

    write(tmp_path / "a" / KUSTOMIZATION_FILE, {**base, "resources": ["../c.yaml"], "namePrefix": "x-"})
    with pytest.raises(RenderError, match="namePrefix"):
        render(tmp_path / "a")

    missing = {**config, "metadata": {"name": "other", "namespace": "n"}, "data": {"k": "v"}}
    write(tmp_path / "b" / "p.yaml", missing)
    write(
        tmp_path / "b" / KUSTOMIZATION_FILE,
        {**base, "resources": ["../c.yaml"], "patches": [{"path": "p.yaml"}]},
    )
    with pytest.raises(RenderError, match="not found"):
        render(tmp_path / "b")

    targeted = {"path": "p.yaml", "target": {"kind": "ConfigMap"}}
    write(tmp_path / "d" / "p.yaml", {**config, "data": {"k": "v"}})
    write(tmp_path / "d" / KUSTOMIZATION_FILE, {**base, "resources": ["../c.yaml"], "patches": [targeted]})
    with pytest.raises(RenderError, match="target"):
        render(tmp_path / "d")


def test_renderer_merges_like_kustomize(tmp_path):
    base = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": "n"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "a",
                            "image": "reg:5000/team/a:1",
                            "env": [{"name": "X", "value": "1"}],
                            "args": ["--one"],
                        },
                        {"name": "b", "image": "b"},
                    ]
                }
            }
        },
    }
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": "n"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "a", "env": [{"name": "Y", "value": "2"}, {"name": "X", "value": "3"}]},
                        {"name": "a", "args": ["--two"]},
                    ]
                }
            }
        },
    }
    write(tmp_path / "d.yaml", deployment)
    write(tmp_path / "p.yaml", patch)
    write(
        tmp_path / KUSTOMIZATION_FILE,
        {
            **base,
            "resources": ["d.yaml"],
            "patches": [{"path": "p.yaml"}],
            "images": [{"name": "reg:5000/team/a", "newTag": "2"}],
        },
    )
    (result,) = render(tmp_path)
    a, b = result["spec"]["template"]["spec"]["containers"]
    assert a["env"] == [{"name": "Y", "value": "2"}, {"name": "X", "value": "3"}]
    assert a["args"] == ["--two"], "lists without a merge key are replaced"
    assert a["image"] == "reg:5000/team/a:2"
    assert b == {"name": "b", "image": "b"}
    assert split_image("reg:5000/a@sha256:00") == ("reg:5000/a", "", "sha256:00")


# --- helpers over rendered resources ---------------------------------------------------------


def find(resources: list[dict], kind: str, name: str) -> dict:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def find_all(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


def workloads(resources: list[dict]) -> list[dict]:
    return [r for r in resources if r["kind"] in WORKLOAD_KINDS]


def is_sidecar(container: dict) -> bool:
    return container.get("restartPolicy") == "Always"


def main_containers(workload: dict) -> list[dict]:
    return pod_spec(workload).get("containers", [])


def sidecars(workload: dict) -> list[dict]:
    return [c for c in pod_spec(workload).get("initContainers", []) if is_sidecar(c)]


def long_running_containers(workload: dict) -> list[dict]:
    return [*main_containers(workload), *sidecars(workload)]


def service_of(container: dict) -> str | None:
    """Which Aerie service a container runs (None for Redis): its image aerie/<service>."""
    name, _, _ = split_image(container["image"])
    if name.startswith("aerie/"):
        service = name.removeprefix("aerie/")
        assert service in AERIE_SERVICES, f"image {container['image']}: no such service"
        return service
    return None


def aerie_containers(resources: list[dict]) -> dict[str, tuple[dict, dict]]:
    """{service: (workload, container)}, each service running in exactly one place."""
    found: dict[str, tuple[dict, dict]] = {}
    for workload in workloads(resources):
        for container in long_running_containers(workload):
            service = service_of(container)
            if service is not None:
                assert service not in found, f"{service} runs in two places"
                found[service] = (workload, container)
    assert sorted(found) == sorted(AERIE_SERVICES)
    return found


def labels_match(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "selectors here use matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def selected_pods(resources: list[dict], selector: dict) -> list[dict]:
    """Workloads whose pods a Service's plain ``selector`` mapping picks."""
    return [w for w in workloads(resources) if labels_match({"matchLabels": selector}, pod_labels(w))]


def secret_data(resources: list[dict], name: str) -> dict[str, str]:
    """A Secret's keys; the example stands in for the one users create by hand."""
    candidates = [r for r in resources if r["kind"] == "Secret" and r["metadata"]["name"] == name]
    for path in STANDALONE_MANIFESTS:
        candidates += [
            d for d in load_documents(path) if d["kind"] == "Secret" and d["metadata"]["name"] == name
        ]
    assert candidates, f"Secret {name} is neither rendered nor in {[str(p) for p in STANDALONE_MANIFESTS]}"
    secret = candidates[0]
    return {**secret.get("data", {}), **secret.get("stringData", {})}


def container_env(resources: list[dict], container: dict) -> dict[str, str]:
    """The environment a container starts with: envFrom sources in order, then env."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "prefix" not in source, "AERIE_* names come as they are, no prefix"
        if "configMapRef" in source:
            values.update(find(resources, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        elif "secretRef" in source:
            values.update(secret_data(resources, source["secretRef"]["name"]))
    for variable in container.get("env", []):
        values[variable["name"]] = variable.get("value", "")
    return values


def settings_fields() -> dict[str, Any]:
    """{AERIE_* env name: default} over every settings class the services read."""
    names: dict[str, Any] = {}
    for dotted in SETTINGS_CLASSES:
        module_name, _, class_name = dotted.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        prefix = cls.model_config.get("env_prefix", "")
        for field_name, field in cls.model_fields.items():
            names[(prefix + field_name).upper()] = field.default
    return names


def setting(env: dict[str, str], name: str) -> str:
    """A container's value of a setting: its environment's, or the setting's default."""
    return env.get(name, str(settings_fields()[name]))


def service_port(service: str) -> int:
    return int(settings_fields()[f"AERIE_{service.upper()}_PORT"])


def container_ports(container: dict) -> dict[str, int]:
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for p in container.get("ports", [])}


def probe_port(container: dict, probe: dict) -> tuple[str, int | None]:
    """(handler, port number) of a probe; named ports resolved against the container."""
    for handler in ("grpc", "httpGet", "tcpSocket"):
        if handler in probe:
            port = probe[handler]["port"]
            if isinstance(port, str):
                assert port in container_ports(container), f"{container['name']}: no port named {port}"
                port = container_ports(container)[port]
            return handler, port
    assert "exec" in probe, f"{container['name']}: unknown probe {probe}"
    return "exec", None


def prestop_sleep_s(container: dict) -> float | None:
    """Seconds a container's preStop hook sleeps (None: no preStop)."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return None
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    assert len(command) == 2 and Path(command[0]).name == "sleep", (
        f"{container['name']}: preStop should be a plain sleep, got {hook}"
    )
    return float(command[1])


_QUANTITY_SUFFIXES = {
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: str | int | float) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert match and (match[2] in _QUANTITY_SUFFIXES or not match[2]), f"bad quantity {value!r}"
    return float(match[1]) * _QUANTITY_SUFFIXES.get(match[2], 1)


# --- layout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERINGS)
def test_everything_lives_in_the_aerie_namespace(name, rendered):
    resources = rendered[name]
    assert find(resources, "Namespace", NAMESPACE)
    for resource in resources:
        if resource["kind"] != "Namespace":
            assert resource["metadata"].get("namespace") == NAMESPACE, resource_id(resource)
    for path in STANDALONE_MANIFESTS:
        for document in load_documents(path):
            assert document["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_volume_claim_exists(name, rendered):
    resources = rendered[name]
    claims = {r["metadata"]["name"] for r in find_all(resources, "PersistentVolumeClaim")}
    for workload in workloads(resources):
        for volume in pod_spec(workload).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, volume
        mounts_known = {v["name"] for v in pod_spec(workload).get("volumes", [])}
        mounts_known |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for container in long_running_containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in mounts_known, f"{container['name']}: no volume {mount['name']}"


# --- every workload: probes, resources, drain, disruption budget ------------------------------


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_container_has_probes_and_resources(name, rendered):
    for workload in workloads(rendered[name]):
        for container in long_running_containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container, f"{where}: no readiness probe"
            assert "livenessProbe" in container, f"{where}: no liveness probe"
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request is not None and limit is not None, f"{where}: {resource} request and limit"
                assert quantity(limit) >= quantity(request), f"{where}: {resource} limit below request"


@pytest.mark.parametrize("name", RENDERINGS)
def test_model_loading_containers_get_a_startup_probe(name, rendered):
    """The port opens after the model loads: liveness must not count before that."""
    for service, (_, container) in aerie_containers(rendered[name]).items():
        if service in MODEL_SERVICES:
            probe = container.get("startupProbe")
            assert probe, f"{service}: no startup probe"
            budget = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
            assert budget >= 300, f"{service}: the startup probe gives up after {budget}s"


def drain_phases(service: str, env: dict[str, str]) -> int:
    """How many AERIE_DRAIN_TIMEOUT_S a service may take after SIGTERM, one after the other.
    The memory service drains its gRPC calls, then stops its worker child, when it runs one."""
    if service == "memory" and "AERIE_MEMORY_WORKER_ENABLED" in settings_fields():
        enabled = setting(env, "AERIE_MEMORY_WORKER_ENABLED").strip().lower()
        return 2 if enabled in ("1", "true", "yes", "on") else 1
    return 1


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_workload_drains(name, rendered):
    """preStop sleep, then SIGTERM and AERIE_DRAIN_TIMEOUT_S: the grace period covers both."""
    resources = rendered[name]
    for workload in workloads(resources):
        spec = pod_spec(workload)
        grace = spec.get("terminationGracePeriodSeconds")
        assert grace is not None, f"{workload['metadata']['name']}: set terminationGracePeriodSeconds"
        needed = 0.0
        for container in main_containers(workload):
            sleep = prestop_sleep_s(container)
            assert sleep is not None and sleep > 0, f"{container['name']}: no preStop sleep"
            drain = 0.0
            if service_of(container) is not None:
                env = container_env(resources, container)
                drain = float(setting(env, "AERIE_DRAIN_TIMEOUT_S")) * drain_phases(
                    service_of(container), env
                )
                assert drain > 0
            needed = max(needed, sleep + drain + EXIT_MARGIN_S)
        # Sidecars stop after the main containers: nothing left to serve, so no preStop.
        for container in sidecars(workload):
            assert prestop_sleep_s(container) is None, f"{container['name']}: a sidecar's preStop only delays"
        assert grace >= needed, f"{workload['metadata']['name']}: grace {grace}s < {needed}s to drain"


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_workload_has_a_disruption_budget_that_lets_drains_proceed(name, rendered):
    resources = rendered[name]
    budgets = find_all(resources, "PodDisruptionBudget")
    for workload in workloads(resources):
        mine = [b for b in budgets if labels_match(b["spec"]["selector"], pod_labels(workload))]
        assert len(mine) == 1, f"{workload['metadata']['name']}: {len(mine)} PodDisruptionBudgets"
        spec = mine[0]["spec"]
        replicas = workload["spec"].get("replicas", 1)
        if "maxUnavailable" in spec:
            assert spec["maxUnavailable"] not in (0, "0%"), "maxUnavailable 0 blocks every drain"
        else:
            assert int(spec["minAvailable"]) < replicas, "minAvailable >= replicas blocks every drain"
    for budget in budgets:
        assert any(labels_match(budget["spec"]["selector"], pod_labels(w)) for w in workloads(resources))


@pytest.mark.parametrize("name", RENDERINGS)
def test_selectors_match_their_pods(name, rendered):
    resources = rendered[name]
    for workload in workloads(resources):
        assert labels_match(workload["spec"]["selector"], pod_labels(workload)), workload["metadata"]["name"]
    for service in find_all(resources, "Service"):
        assert selected_pods(resources, service["spec"]["selector"]), f"Service {service['metadata']['name']}"


# --- the services ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERINGS)
def test_gateway_is_autoscaled(name, rendered):
    resources = rendered[name]
    gateway = find(resources, "Deployment", "gateway")
    assert "replicas" not in gateway["spec"], "the autoscaler owns the gateway's replicas"
    (hpa,) = [h for h in find_all(resources, "HorizontalPodAutoscaler")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "gateway")
    assert hpa["spec"]["minReplicas"] >= 2, "two gateways at least, so one can drain"
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Resource":
            container = main_containers(gateway)[0]
            assert metric["resource"]["name"] in container["resources"]["requests"], (
                "utilization is measured against the request"
            )


@pytest.mark.parametrize("name", RENDERINGS)
def test_grpc_backends_are_headless_and_reached_by_dns(name, rendered):
    """The gateway's dns:/// addresses name headless Services that reach the right ports."""
    resources = rendered[name]
    config = find(resources, "ConfigMap", "aerie-config")["data"]
    containers = aerie_containers(resources)
    for service in GRPC_SERVICES:
        addr = config[f"AERIE_{service.upper()}_ADDR"]
        match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", addr)
        assert match, (
            f"AERIE_{service.upper()}_ADDR={addr}: want dns:///NAME.NAMESPACE.svc.cluster.local:PORT"
        )
        svc_name, namespace, port = match[1], match[2], int(match[3])
        assert namespace == NAMESPACE
        svc = find(resources, "Service", svc_name)
        assert svc["spec"].get("clusterIP") == "None", f"{svc_name} must be headless for per-call balancing"
        assert port == service_port(service)
        (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
        workload, container = containers[service]
        assert workload in selected_pods(resources, svc["spec"]["selector"]), f"{svc_name} misses {service}"
        target = svc_port["targetPort"]
        target = container_ports(container)[target] if isinstance(target, str) else target
        assert target == service_port(service)


@pytest.mark.parametrize("name", RENDERINGS)
def test_redis(name, rendered):
    resources = rendered[name]
    url = find(resources, "ConfigMap", "aerie-config")["data"]["AERIE_REDIS_URL"]
    match = re.fullmatch(r"rediss?://([^/:@]+)(?::(\d+))?/\d+", url)
    assert match, f"AERIE_REDIS_URL={url}: a password belongs in the Secret, not the ConfigMap"
    statefulsets = [s for s in find_all(resources, "StatefulSet") if s["metadata"]["name"] == "redis"]
    if not statefulsets:
        assert name.startswith("examples/"), f"{name}: only an example may drop the in-cluster Redis"
        return
    (redis,) = statefulsets
    host, port = match[1], int(match[2] or 6379)
    assert host == f"redis.{NAMESPACE}.svc.cluster.local"
    svc = find(resources, "Service", "redis")
    assert svc["spec"].get("clusterIP") == "None" and redis["spec"]["serviceName"] == "redis"
    (container,) = main_containers(redis)
    assert port in container_ports(container).values()

    compose = yaml.safe_load(COMPOSE.read_text())["services"]["redis"]
    assert container["image"] == compose["image"], "the same Redis as docker-compose.yml"
    args = container.get("args", [])
    assert args[args.index("--appendonly") + 1] == "yes", "AOF on"
    assert args[args.index("--appendfsync") + 1] == "always", "AOF synced before each answer"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    data_dir = args[args.index("--dir") + 1]
    assert {"name": claim["metadata"]["name"], "mountPath": data_dir} in container["volumeMounts"]


@pytest.mark.parametrize("name", RENDERINGS)
def test_drafter_is_a_sidecar_of_the_verifier(name, rendered):
    resources = rendered[name]
    containers = aerie_containers(resources)
    verifier_pod, verifier = containers["verifier"]
    drafter_pod, drafter = containers["drafter"]
    assert verifier_pod is drafter_pod, "the drafter runs in the verifier's pod"
    assert is_sidecar(drafter), "a native sidecar: up before the verifier, stopped after it"
    env = container_env(resources, verifier)
    assert env["AERIE_DRAFTER_ADDR"] == f"127.0.0.1:{service_port('drafter')}"


@pytest.mark.parametrize("name", RENDERINGS)
def test_gpu_only_in_the_gpu_overlay(name, rendered):
    resources = rendered[name]
    if not includes(K8S / name, GPU_OVERLAY):
        assert GPU_RESOURCE not in json.dumps(resources), f"{name} must not ask for a GPU"
        return
    for workload in workloads(resources):
        for container in pod_spec(workload).get("initContainers", []) + main_containers(workload):
            limits = container.get("resources", {}).get("limits", {})
            requests = container.get("resources", {}).get("requests", {})
            if service_of(container) == "verifier":
                assert limits.get(GPU_RESOURCE) == "1", "one GPU per verifier"
                assert requests.get(GPU_RESOURCE, "1") == "1"
                _, verifier = aerie_containers(resources)["verifier"]
                assert container_env(resources, verifier)["AERIE_DEVICE"].startswith("cuda")
                image = split_image(container["image"])
                assert image[1] == "cuda", "the verifier image built with CUDA torch"
            else:
                assert GPU_RESOURCE not in limits and GPU_RESOURCE not in requests, container["name"]


@pytest.mark.parametrize("name", RENDERINGS)
def test_torch_threads_fit_the_cpu_limit(name, rendered):
    resources = rendered[name]
    for _, container in aerie_containers(resources).values():
        threads = int(setting(container_env(resources, container), "AERIE_TORCH_THREADS"))
        limit = quantity(container["resources"]["limits"]["cpu"])
        assert threads <= limit, f"{container['name']}: {threads} torch threads on {limit} CPUs"
    # set to the limit, not left to the quota's reading (aerie_common.torch_threads)
    _, memory = aerie_containers(resources)["memory"]
    training = int(setting(container_env(resources, memory), "AERIE_MEMORY_TRAIN_THREADS"))
    assert 1 <= training <= quantity(memory["resources"]["limits"]["cpu"])


# --- cross-checks with the code ---------------------------------------------------------------


def aerie_names(resources: list[dict]) -> dict[str, str]:
    """{AERIE_* name: where} over ConfigMaps, Secrets and container env."""
    names: dict[str, str] = {}
    for resource in resources:
        if resource["kind"] in ("ConfigMap", "Secret"):
            for key in [*resource.get("data", {}), *resource.get("stringData", {})]:
                names[key] = f"{resource['kind']}/{resource['metadata']['name']}"
        elif resource["kind"] in WORKLOAD_KINDS:
            spec = pod_spec(resource)
            for container in spec.get("initContainers", []) + spec.get("containers", []):
                for variable in container.get("env", []):
                    names[variable["name"]] = f"{resource['metadata']['name']}/{container['name']}"
    return {k: v for k, v in names.items() if k.startswith("AERIE_")}


@pytest.mark.parametrize("name", [*RENDERINGS, "secret.example.yaml"])
def test_aerie_names_are_settings_fields(name, rendered):
    resources = rendered[name] if name in rendered else load_documents(K8S / name)
    names = aerie_names(resources)
    assert names
    known = settings_fields()
    unknown = {k: v for k, v in names.items() if k not in known}
    assert not unknown, f"{name}: AERIE_* names no settings class reads: {unknown}"


@pytest.mark.parametrize("name", RENDERINGS)
def test_secrets_override_the_config_map(name, rendered):
    for _, container in aerie_containers(rendered[name]).values():
        kinds = [next(iter(s)) for s in container.get("envFrom", [])]
        assert kinds[:1] == ["configMapRef"], f"{container['name']}: aerie-config first"
        if "secretRef" in kinds:
            assert kinds.index("secretRef") > kinds.index("configMapRef"), "the Secret's values must win"
    _, gateway = aerie_containers(rendered[name])["gateway"]
    assert "AERIE_API_KEYS" in container_env(rendered[name], gateway), "the gateway reads the API keys"


@pytest.mark.parametrize("name", RENDERINGS)
def test_ports_and_probes_match_the_services(name, rendered):
    resources = rendered[name]
    for service, (_, container) in aerie_containers(resources).items():
        port = service_port(service)
        env = container_env(resources, container)
        assert container["name"] == service
        # Ports named *metrics are Prometheus's (tests/unit/test_service_metrics.py checks them).
        serving = [p for n, p in container_ports(container).items() if not n.endswith("metrics")]
        assert serving == [port], f"{service}: containerPort"
        assert int(setting(env, f"AERIE_{service.upper()}_PORT")) == port
        assert setting(env, f"AERIE_{service.upper()}_HOST") == "0.0.0.0", f"{service}: bind every interface"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind not in container:
                continue
            handler, probed = probe_port(container, container[kind])
            assert probed == port, f"{service} {kind} probes port {probed}, the service is on {port}"
            if service in GRPC_SERVICES:
                # Liveness may ask only for the port (memory: its health follows Redis).
                allowed = ("grpc", "tcpSocket") if kind == "livenessProbe" else ("grpc",)
                assert handler in allowed, f"{service} {kind}: a native grpc probe"
                if handler == "grpc":
                    assert container[kind]["grpc"].get("service", "") == "", "the whole server's health"
            else:
                assert handler == "httpGet", f"{service} {kind}: HTTP"


@pytest.fixture(scope="module")
def gateway_routes() -> set[str]:
    from aerie_gateway.app import create_app
    from aerie_gateway.settings import GatewaySettings

    app = create_app(GatewaySettings())
    return {route.path for route in app.routes if "GET" in (getattr(route, "methods", None) or ())}


@pytest.mark.parametrize("name", RENDERINGS)
def test_gateway_probes_are_its_routes(name, rendered, gateway_routes):
    resources = rendered[name]
    workload, gateway = aerie_containers(resources)["gateway"]
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert {"/health", "/ready"} <= gateway_routes
    # /ready asks every backend, each within AERIE_HEALTH_TIMEOUT_S: the probe must wait longer.
    health_timeout = float(setting(container_env(resources, gateway), "AERIE_HEALTH_TIMEOUT_S"))
    assert gateway["readinessProbe"].get("timeoutSeconds", 1) > health_timeout
    annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:
        assert int(annotations["prometheus.io/port"]) == service_port("gateway")
        assert annotations["prometheus.io/path"] in gateway_routes


def dockerfile_env_and_args(service: str) -> dict[str, str]:
    """ENV and ARG defaults (KEY=VALUE pairs) of services/<service>/Dockerfile."""
    text = (ROOT / "services" / service / "Dockerfile").read_text().replace("\\\n", " ")
    values: dict[str, str] = {}
    for line in text.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword in ("ENV", "ARG"):
            values.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", rest))
    return values


@pytest.mark.parametrize("name", RENDERINGS)
def test_images_run_the_services_as_their_user(name, rendered):
    for service, (workload, container) in aerie_containers(rendered[name]).items():
        assert (ROOT / "services" / service / "Dockerfile").is_file()
        assert split_image(container["image"])[0] == f"aerie/{service}"
        assert "command" not in container and "args" not in container, f"{service}: the image's CMD runs it"
        uid = int(dockerfile_env_and_args(service)["AERIE_UID"])
        security = pod_spec(workload)["securityContext"]
        assert security["runAsUser"] == uid and security["fsGroup"] == uid, f"{service}: the image's user"
        assert security.get("runAsNonRoot") is True


@pytest.mark.parametrize("name", RENDERINGS)
def test_model_cache_and_model_volumes(name, rendered):
    resources = rendered[name]
    containers = aerie_containers(resources)
    for service in MODEL_SERVICES:
        _, container = containers[service]
        cache = container_env(resources, container)["AERIE_MODEL_CACHE"]
        assert cache == dockerfile_env_and_args(service)["AERIE_MODEL_CACHE"], f"{service}: the image's cache"
        assert cache in [m["mountPath"] for m in container.get("volumeMounts", [])], f"{service}: mount it"

    memory_pod, memory = containers["memory"]
    cache = container_env(resources, memory)["AERIE_MODEL_CACHE"]
    volumes = {v["name"]: v for v in pod_spec(memory_pod)["volumes"]}
    (mount,) = [m for m in memory["volumeMounts"] if m["mountPath"] == f"{cache}/memory"]
    assert "persistentVolumeClaim" in volumes[mount["name"]], "memory model versions on a PVC"
    assert memory_pod["spec"]["strategy"]["type"] == "Recreate", "a ReadWriteOnce volume: one pod at a time"

    _, verifier = containers["verifier"]
    target = container_env(resources, verifier)["AERIE_TARGET_MODEL"]
    if target.startswith("/"):
        mounts = [m["mountPath"] for m in verifier["volumeMounts"]]
        assert any(target.startswith(m.rstrip("/") + "/") for m in mounts), f"{target} is on no volume"
    else:
        from aerie_common.model_store import BUILTIN_MODELS

        assert target in BUILTIN_MODELS


# --- docs/deploy.md -----------------------------------------------------------------------------


def docs_text() -> str:
    assert DOCS.is_file(), "docs/deploy.md is missing"
    return DOCS.read_text()


def test_docs_commands_name_what_exists():
    text = docs_text()
    directories = {
        d.rstrip("/")
        for d in re.findall(r"kubectl (?:kustomize|apply -k|delete -k|diff -k) (deploy/[\w./-]+)", text)
    }
    assert {f"deploy/k8s/{o}" for o in OVERLAYS} <= directories, "the doc shows how to render both overlays"
    for directory in directories:
        assert (ROOT / directory / KUSTOMIZATION_FILE).is_file(), f"docs/deploy.md: {directory}"
        assert render(ROOT / directory)
    for path in re.findall(
        r"(?:-f|--filename) (deploy/[\w./-]+|services/[\w./-]+|docker-compose[\w.]*\.yml)", text
    ):
        assert (ROOT / path).is_file(), f"docs/deploy.md: {path}"


def test_docs_settings_exist():
    named = set(re.findall(r"AERIE_[A-Z0-9_]*[A-Z0-9]", docs_text()))
    assert named, "docs/deploy.md names the settings it talks about"
    unknown = named - set(settings_fields())
    assert not unknown, f"docs/deploy.md names settings that do not exist: {sorted(unknown)}"


def test_docs_metrics_exist():
    from aerie_common.metrics import registry_for
    from aerie_gateway.metrics import GatewayMetrics
    from aerie_memory.metrics import MemoryCollector
    from aerie_memory.models import MemoryCache

    class OneJob:  # the memory's Redis, as its collector reads it
        def xinfo_groups(self, stream):
            return []

        def hgetall(self, key):
            return {b"ingest:succeeded:count": b"1", b"ingest:succeeded:seconds": b"9.5"}

    servicer = SimpleNamespace(
        queries={True: 0, False: 0},
        query_seconds=0.0,
        documents_ingested={"accepted": 0},
        cache=MemoryCache(1),
    )
    exported = set()
    for registry in (GatewayMetrics().registry, registry_for(MemoryCollector(servicer, OneJob()))):
        for family in registry.collect():
            exported.add(family.name)
            exported.update(sample.name for sample in family.samples)
    named = set(re.findall(r"aerie:[a-z0-9_]+", docs_text()))
    assert {"aerie:num_requests_waiting", "aerie:memory_jobs_waiting"} <= named
    assert not named - exported, (
        f"docs/deploy.md names metrics the gateway and memory do not export: {named - exported}"
    )


def test_docs_manifests_follow_the_api_schema(kubernetes_validate):
    """The objects docs/deploy.md shows (```yaml blocks; patch fragments are fenced
    ```yaml patch) are valid and use real AERIE_* names."""
    blocks = re.findall(r"```yaml\n(.*?)```", docs_text(), flags=re.S)
    objects = [d for block in blocks for d in yaml.safe_load_all(block) if d]
    assert objects, "docs/deploy.md shows at least one manifest (the verifier autoscaler)"
    for document in objects:
        if document.get("kind") == "Kustomization":
            continue
        errors = schema_errors(kubernetes_validate, document, KUBERNETES_VERSIONS[-1])
        assert not errors, "docs/deploy.md:\n  " + "\n  ".join(errors)
        unknown = set(aerie_names([document])) - set(settings_fields())
        assert not unknown, f"docs/deploy.md uses unknown settings {unknown}"
