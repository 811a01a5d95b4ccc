"""A small kustomize renderer for tests/unit/test_k8s.py: ``kubectl kustomize DIR`` without
kubectl.

It supports exactly what deploy/k8s uses, and refuses everything else instead of rendering
it wrongly:

- ``resources``: YAML files (one or more documents) and folders with a kustomization.yaml;
- ``patches``: strategic-merge patches given by ``path`` or inline ``patch``, each naming
  its target by its own apiVersion, kind, metadata.name and metadata.namespace; ``$patch:
  delete`` on a whole resource removes it;
- ``images``: ``name`` with ``newName``, ``newTag`` and/or ``digest``.

Strategic merge follows Kubernetes' rules for the fields the manifests patch: mappings
merge, ``null`` removes a key, lists of containers, env, volumes, volume mounts and ports
merge by their key (items new to the list go first, as kustomize puts them), and every
other list is replaced. test_k8s.py compares this renderer's output with ``kubectl
kustomize`` whenever a kubectl is installed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILE = "kustomization.yaml"
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}
SUPPORTED_PATCH_KEYS = {"path", "patch"}
SUPPORTED_IMAGE_KEYS = {"name", "newName", "newTag", "digest"}

# Lists merged by a key in a strategic-merge patch (Kubernetes' patchMergeKey), by field name.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
}

# Where pod specs sit, by kind (what kustomize's image transformer looks at).
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


class RenderError(Exception):
    """The kustomization uses something this renderer does not support, or is wrong."""


def resource_id(resource: dict) -> tuple[str, str, str, str]:
    """(apiVersion group, kind, namespace, name): what kustomize matches patches by."""
    group = resource.get("apiVersion", "").rpartition("/")[0]
    meta = resource.get("metadata") or {}
    return group, resource.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


def load_documents(path: Path) -> list[dict]:
    with path.open() as f:
        documents = [d for d in yaml.safe_load_all(f) if d is not None]
    for document in documents:
        if not isinstance(document, dict) or "kind" not in document:
            raise RenderError(f"{path}: every document must be a Kubernetes object")
    return documents


def read_kustomization(directory: Path) -> dict:
    path = directory / KUSTOMIZATION_FILE
    if not path.is_file():
        raise RenderError(f"{directory}: no {KUSTOMIZATION_FILE}")
    kustomization = yaml.safe_load(path.read_text()) or {}
    unsupported = set(kustomization) - SUPPORTED_KEYS
    if unsupported:
        raise RenderError(
            f"{path}: {sorted(unsupported)} not supported here; keep to {sorted(SUPPORTED_KEYS)}"
        )
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{path}: kind must be Kustomization")
    return kustomization


def render(directory: Path) -> list[dict]:
    """The resources ``kubectl kustomize directory`` prints, in the order they are listed."""
    directory = Path(directory)
    kustomization = read_kustomization(directory)
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources.extend(render(path))
        elif path.is_file():
            resources.extend(load_documents(path))
        else:
            raise RenderError(f"{directory}: resource {entry} does not exist")
    seen: set[tuple] = set()
    for resource in resources:
        rid = resource_id(resource)
        if rid in seen:
            raise RenderError(f"{directory}: {rid} is listed twice")
        seen.add(rid)

    for entry in kustomization.get("patches", []):
        unsupported = set(entry) - SUPPORTED_PATCH_KEYS
        if unsupported or len(entry) != 1:
            raise RenderError(f"{directory}: patch {entry}: give exactly one of path or patch, no target")
        if "path" in entry:
            patches = load_documents(directory / entry["path"])
        else:
            patches = [d for d in yaml.safe_load_all(entry["patch"]) if d is not None]
        for patch in patches:
            resources = apply_patch(resources, patch, directory)

    for image in kustomization.get("images", []):
        unsupported = set(image) - SUPPORTED_IMAGE_KEYS
        if unsupported or "name" not in image:
            raise RenderError(f"{directory}: image {image}: only {sorted(SUPPORTED_IMAGE_KEYS)}")
        for resource in resources:
            for container in pod_containers(resource):
                container["image"] = set_image(container["image"], image)
    return resources


def apply_patch(resources: list[dict], patch: dict, where: Path) -> list[dict]:
    if isinstance(patch, list) or "op" in patch:
        raise RenderError(f"{where}: JSON 6902 patches are not supported; use strategic merge")
    rid = resource_id(patch)
    matches = [i for i, r in enumerate(resources) if resource_id(r) == rid]
    if len(matches) != 1:
        raise RenderError(f"{where}: patch target {rid} not found")
    (index,) = matches
    directive = patch.get("$patch")
    if directive == "delete":
        return resources[:index] + resources[index + 1 :]
    if directive is not None:
        raise RenderError(f"{where}: $patch: {directive} is not supported")
    patched = list(resources)
    patched[index] = strategic_merge(resources[index], patch)
    return patched


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes' strategic merge of ``patch`` into ``base`` (a new object; both unchanged)."""
    if isinstance(patch, dict):
        directives = [k for k in patch if k.startswith("$")]
        if directives:
            raise RenderError(f"{field}: patch directives {directives} are not supported")
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = strategic_merge(None, value, key)
        return merged
    if isinstance(patch, list) and isinstance(base, list):
        key = merge_key(field, base + patch)
        if key is None:
            return copy.deepcopy(patch)
        merged = copy.deepcopy(base)
        new = []
        for item in patch:
            existing = [i for i, b in enumerate(merged) if b.get(key) == item.get(key)]
            if existing:
                merged[existing[0]] = strategic_merge(merged[existing[0]], item, field)
            else:
                new.append(copy.deepcopy(item))
        return new + merged
    return copy.deepcopy(patch)


def merge_key(field: str, items: list) -> str | None:
    if field == "ports" and all(isinstance(i, dict) for i in items):
        # Container ports merge by containerPort, Service ports by port.
        return "containerPort" if all("containerPort" in i for i in items) else "port"
    key = MERGE_KEYS.get(field)
    if key is not None and not all(isinstance(i, dict) and key in i for i in items):
        raise RenderError(f"{field}: every item needs its merge key {key}")
    return key


def pod_spec(resource: dict) -> dict | None:
    path = POD_SPEC_PATHS.get(resource.get("kind", ""))
    node: Any = resource
    for step in path or ():
        node = node.get(step) if isinstance(node, dict) else None
    return node if path and isinstance(node, dict) else None


def pod_containers(resource: dict) -> list[dict]:
    spec = pod_spec(resource) or {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; a registry port is not a tag."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def set_image(image: str, entry: dict) -> str:
    name, tag, digest = split_image(image)
    if name != entry["name"]:
        return image
    name = entry.get("newName", name)
    if "digest" in entry:
        return f"{name}@{entry['digest']}"
    if "newTag" in entry:
        return f"{name}:{entry['newTag']}"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
