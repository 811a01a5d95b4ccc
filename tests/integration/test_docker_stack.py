"""The whole stack in containers: build the four images, start Redis and the services as
docker-compose.yml says, and ask the gateway a question.

Needs a Docker engine (skipped, with the reason, where none answers). Images are built
with the Docker SDK (the classic builder; they are tagged ``aerie-it-<service>``, kept
between runs as a build cache). The stack then starts with ``docker compose`` when the
CLI plugin is there, else with the SDK from the same compose files, read here. On a host
whose engine has the NVIDIA runtime the verifier gets a GPU (docker-compose.yml alone);
elsewhere docker-compose.cpu.yml is merged in. Everything but the images is removed after.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.local_servers import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
PROJECT = "aerie-it"
START_TIMEOUT_S = 900  # first start: model conversion on a CPU, three services at once
BUILD_TIMEOUT_S = 3600


# --- the engine --------------------------------------------------------------------------------


def docker_client():
    """A client whose engine answers, or skip the module saying why not."""
    try:
        import docker

        client = docker.from_env(timeout=BUILD_TIMEOUT_S)
        client.ping()
    except Exception as exc:  # no socket, no permission, engine down: all mean "no engine"
        pytest.skip(f"no Docker engine reachable: {type(exc).__name__}: {exc}")
    return client


def compose_cli() -> list[str] | None:
    """The `docker compose` command when the CLI and its compose plugin are installed."""
    if shutil.which("docker") is None:
        return None
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    return ["docker", "compose"] if probe.returncode == 0 else None


def has_nvidia_runtime(client) -> bool:
    return "nvidia" in (client.info().get("Runtimes") or {})


# --- reading the compose files (the same rules as tests/unit/test_compose.py) -------------------


class _Tagged:
    def __init__(self, tag: str, value: Any):
        self.tag, self.value = tag, value


class _Loader(yaml.SafeLoader):
    pass


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> _Tagged:
    if isinstance(node, yaml.MappingNode):
        return _Tagged(suffix, loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return _Tagged(suffix, loader.construct_sequence(node, deep=True))
    return _Tagged(suffix, loader.construct_scalar(node))


_Loader.add_multi_constructor("!", _construct_tagged)


def _plain(value: Any) -> Any:
    if isinstance(value, _Tagged):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _merge(base: Any, override: Any, key: str = "") -> Any:
    if isinstance(override, _Tagged) and override.tag == "override":
        return _plain(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for k, v in override.items():
            if isinstance(v, _Tagged) and v.tag == "reset":
                merged.pop(k, None)
            else:
                merged[k] = _merge(merged[k], v, k) if k in merged else _plain(v)
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in ("command", "entrypoint", "test"):
        return base + [v for v in map(_plain, override) if v not in base]
    return _plain(override)


_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_]\w*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_]\w*))")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    def substitute(m: re.Match) -> str:
        if m[1]:
            return "$"
        name, op, arg = m[2] or m[5], m[3], m[4] or ""
        if op in (":-", "-"):
            return env[name] if name in env and (env[name] != "" or op == "-") else arg
        return env.get(name, "")

    if isinstance(value, str):
        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    return value


def compose_model(files: list[Path], env: dict[str, str]) -> dict:
    model: Any = {}
    for path in files:
        with path.open() as f:
            model = _merge(model, yaml.load(f, Loader=_Loader))  # a SafeLoader subclass: safe
    return _interpolate(model, env)


# --- building and running --------------------------------------------------------------------


def image_tag(service: str) -> str:
    # What `docker compose -p aerie-it` names a built service's image, so compose reuses it.
    return f"{PROJECT}-{service}"


def build_images(client, model: dict) -> None:
    for name, service in model["services"].items():
        build = service.get("build")
        if not build:
            continue
        args = {k: str(v) for k, v in (build.get("args") or {}).items()}
        try:
            client.images.build(
                path=str(ROOT / build.get("context", ".")),
                dockerfile=build["dockerfile"],
                tag=image_tag(name),
                buildargs=args,
                rm=True,
                forcerm=True,
            )
        except Exception as exc:
            log = "".join(
                chunk.get("stream", "") + chunk.get("error", "") for chunk in getattr(exc, "build_log", [])
            )
            raise AssertionError(f"building {name} failed: {exc}\n{log[-6000:]}") from exc


def seconds_to_ns(duration: str) -> int:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return int(sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)) * 1e9)


def start_order(model: dict) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dep in model["services"][name].get("depends_on", {}):
                visit(dep)
            order.append(name)

    for name in model["services"]:
        visit(name)
    return order


class SdkStack:
    """What `docker compose up` would do for this file, with the Docker SDK."""

    def __init__(self, client, model: dict):
        self.client, self.model = client, model
        self.containers: dict[str, Any] = {}
        self.network = None
        self.volumes: list[Any] = []

    def remove_leftovers(self) -> None:
        """What a run that was killed before its teardown left behind."""
        for container in self.client.containers.list(all=True, filters={"name": f"{PROJECT}-"}):
            if container.name.startswith(f"{PROJECT}-"):
                container.remove(force=True, v=True)
        for network in self.client.networks.list(names=[f"{PROJECT}_default"]):
            network.remove()
        for volume in self.model.get("volumes") or {}:
            for leftover in self.client.volumes.list(filters={"name": f"{PROJECT}_{volume}"}):
                if leftover.name == f"{PROJECT}_{volume}":
                    leftover.remove(force=True)

    def up(self) -> None:
        import docker

        self.remove_leftovers()
        self.network = self.client.networks.create(f"{PROJECT}_default", driver="bridge")
        for volume in self.model.get("volumes") or {}:
            self.volumes.append(self.client.volumes.create(f"{PROJECT}_{volume}"))
        for name in start_order(self.model):
            service = self.model["services"][name]
            for dep in service.get("depends_on", {}):
                self.wait_healthy(dep)
            image = service.get("image") or image_tag(name)
            if "image" in service:
                try:
                    self.client.images.get(image)
                except docker.errors.ImageNotFound:
                    self.client.images.pull(image)
            check = service["healthcheck"]
            device_requests = [
                docker.types.DeviceRequest(
                    driver=d.get("driver", ""), count=d.get("count", -1), capabilities=[d["capabilities"]]
                )
                for d in service.get("deploy", {})
                .get("resources", {})
                .get("reservations", {})
                .get("devices", [])
            ]
            ports = {}
            for spec in service.get("ports", []):
                host, container = str(spec).rsplit(":", 1)
                ports[f"{container}/tcp"] = ("127.0.0.1", int(host))
            container = self.client.containers.create(
                image,
                command=service.get("command"),
                name=f"{PROJECT}-{name}",
                environment={
                    k: "" if v is None else str(v) for k, v in (service.get("environment") or {}).items()
                },
                volumes={
                    f"{PROJECT}_{source}": {"bind": target, "mode": "rw"}
                    for source, target in (v.split(":")[:2] for v in service.get("volumes", []))
                },
                ports=ports,
                device_requests=device_requests or None,
                healthcheck={
                    "test": check["test"],
                    "interval": seconds_to_ns(check.get("interval", "30s")),
                    "timeout": seconds_to_ns(check.get("timeout", "30s")),
                    "retries": int(check.get("retries", 3)),
                    "start_period": seconds_to_ns(check.get("start_period", "0s")),
                },
                network=self.network.name,
                # Reachable by its service name, as under compose.
                networking_config={self.network.name: self.client.api.create_endpoint_config(aliases=[name])},
                detach=True,
            )
            container.start()
            self.containers[name] = container
        for name in self.containers:
            self.wait_healthy(name)

    def wait_healthy(self, name: str) -> None:
        container = self.containers[name]
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            container.reload()
            state = container.attrs["State"]
            if state.get("Health", {}).get("Status") == "healthy":
                return
            if state["Status"] in ("exited", "dead"):
                break
            time.sleep(3)
        raise AssertionError(f"{name} did not become healthy:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for name, container in self.containers.items():
            try:
                tail = container.logs(tail=80).decode(errors="replace")
            except Exception as exc:
                tail = f"(no logs: {exc})"
            parts.append(f"--- {name}\n{tail}")
        return "\n".join(parts)

    def down(self) -> None:
        for container in reversed(list(self.containers.values())):
            try:
                container.stop(timeout=30)
            except Exception:
                pass
            container.remove(force=True, v=True)
        if self.network is not None:
            self.network.remove()
        for volume in self.volumes:
            volume.remove(force=True)


class CliStack:
    def __init__(self, cli: list[str], files: list[Path], env: dict[str, str]):
        self.base = [*cli, "-p", PROJECT, *(arg for f in files for arg in ("-f", str(f)))]
        self.env = env

    def run(self, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.base, *args],
            cwd=ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def up(self) -> None:
        self.down()  # whatever a killed run left behind
        # The images built above carry compose's own names (PROJECT-service): run exactly those.
        result = self.run(
            "up",
            "-d",
            "--no-build",
            "--wait",
            "--wait-timeout",
            str(START_TIMEOUT_S),
            timeout=START_TIMEOUT_S + 60,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"docker compose up failed:\n{result.stdout}\n{result.stderr}\n{self.logs()}"
            )

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "80", timeout=120).stdout

    def down(self) -> None:
        self.run("down", "-v", "--remove-orphans", "--timeout", "30", timeout=300)


@pytest.fixture(scope="module")
def stack():
    client = docker_client()
    files = [COMPOSE] if has_nvidia_runtime(client) else [COMPOSE, COMPOSE_CPU]
    api_key = f"it-{uuid.uuid4().hex}"
    env = {"AERIE_GATEWAY_PORT": str(free_port()), "AERIE_API_KEYS": api_key}
    model = compose_model(files, env)
    build_images(client, model)
    cli = compose_cli()
    runner = CliStack(cli, files, env) if cli else SdkStack(client, model)
    try:
        runner.up()
        yield {
            "url": f"http://127.0.0.1:{env['AERIE_GATEWAY_PORT']}",
            "key": api_key,
            "logs": runner.logs,
        }
    finally:
        runner.down()


def wait_ready(url: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/ready", timeout=5)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(2)
    raise AssertionError(f"gateway never ready: {last}")


@pytest.mark.timeout(BUILD_TIMEOUT_S + START_TIMEOUT_S + 600)
def test_chat_completion_through_the_containers(stack):
    url, headers = stack["url"], {"Authorization": f"Bearer {stack['key']}"}
    try:
        wait_ready(url)
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        assert models.status_code == 200, models.text
        model_id = models.json()["data"][0]["id"]
        response = httpx.post(
            f"{url}/v1/chat/completions",
            headers=headers,
            json={
                "model": model_id,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 32,
                "temperature": 0,
            },
            timeout=300,
        )
        assert response.status_code == 200, response.text
        answer = response.json()["choices"][0]["message"]["content"]
        assert "Paris" in answer, json.dumps(response.json(), indent=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- service logs ---\n{stack['logs']()}") from exc
