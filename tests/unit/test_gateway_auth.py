"""API keys scoped to namespaces: the keys file (JSON or YAML) and its start-up errors,
403 on another namespace for every memory route and chat memory, /metrics protection.
Against the fake verifier and memory (real gRPC servers) and a real Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aerie_gateway.app import create_app
from aerie_gateway.auth import ANYONE, KeyRegistry, KeysFileError, key_digest
from aerie_gateway.settings import GatewaySettings

from tests.unit.test_gateway import (  # noqa: F401  (fixtures)
    FakeVerifier,
    asgi_client,
    assert_error,
    chat_body,
    fake_backends,
    gateway_redis_url,
)
from tests.unit.test_gateway_memory import FakeMemory

TEAM_A = "sk-team-a-0123456789"
TEAM_B = "sk-team-b-0123456789"
ADMIN = "sk-admin-0123456789"
# FakeMemory's job-1 belongs to namespace "ns".
KEYS_FILE = {
    "keys": [
        {"key": TEAM_A, "name": "team-a-app", "namespaces": ["ns"]},
        {"key": TEAM_B, "name": "team-b-app", "namespaces": ["team-b", "other"]},
        {"key": ADMIN, "name": "ops", "namespaces": ["*"]},
    ]
}


class RecordingMemory(FakeMemory):
    """FakeMemory that records every call as (method, namespace or job id)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def Ingest(self, request, context):
        self.calls.append(("Ingest", request.namespace))
        return super().Ingest(request, context)

    def GetJob(self, request, context):
        self.calls.append(("GetJob", request.job_id))
        return super().GetJob(request, context)

    def GetNamespace(self, request, context):
        self.calls.append(("GetNamespace", request.namespace))
        return super().GetNamespace(request, context)

    def DeleteDocument(self, request, context):
        self.calls.append(("DeleteDocument", request.namespace))
        return super().DeleteDocument(request, context)

    def Rollback(self, request, context):
        self.calls.append(("Rollback", request.namespace))
        return super().Rollback(request, context)

    def Query(self, request, context):
        self.calls.append(("Query", request.namespace))
        return super().Query(request, context)

    def DeleteNamespace(self, request, context):
        self.calls.append(("DeleteNamespace", request.namespace))
        return super().DeleteNamespace(request, context)

    def ListNamespaces(self, request, context):
        self.calls.append(("ListNamespaces", ""))
        return super().ListNamespaces(request, context)

    def ListDocuments(self, request, context):
        self.calls.append(("ListDocuments", request.namespace))
        return super().ListDocuments(request, context)

    def GetDocument(self, request, context):
        self.calls.append(("GetDocument", request.namespace))
        return super().GetDocument(request, context)


@pytest.fixture(scope="module")
def backends():
    verifier, memory = FakeVerifier(), RecordingMemory()
    with fake_backends(verifier, memory) as addr:
        yield verifier, memory, addr


@pytest.fixture
def keys_file(tmp_path) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS_FILE))
    return path


@pytest.fixture
def make_app(backends, gateway_redis_url):  # noqa: F811
    _, _, addr = backends

    def make(**overrides):
        fields = dict(
            verifier_addr=addr,
            drafter_addr=addr,
            memory_addr=addr,
            redis_url=gateway_redis_url,
            memory_timeout_s=5.0,
            memory_chat_budget_s=5.0,
        )
        return create_app(GatewaySettings(**{**fields, **overrides}))

    return make


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# Each memory operation, on a namespace: (method, path, json body or None), as the gateway
# is asked for it, and the memory call it leads to.
def memory_requests(namespace: str) -> dict[str, tuple[str, str, dict | None]]:
    return {
        "ingest": (
            "POST",
            "/memory/ingest",
            {"namespace": namespace, "documents": [{"id": "a", "text": "x"}]},
        ),
        "query": ("POST", "/memory/query", {"namespace": namespace, "question": "Who governs Naxpry?"}),
        "namespace": ("GET", f"/memory/namespaces/{namespace}", None),
        "rollback": ("POST", f"/memory/namespaces/{namespace}/rollback", {}),
        "documents": ("GET", f"/memory/namespaces/{namespace}/documents", None),
        "forget namespace": ("DELETE", f"/memory/namespaces/{namespace}", None),
        "document": ("GET", f"/memory/documents/a/b?namespace={namespace}", None),
        "delete": ("DELETE", f"/memory/documents/a/b?namespace={namespace}", None),
        "chat": (
            "POST",
            "/v1/chat/completions",
            chat_body("Who governs Naxpry?", memory={"namespace": namespace, "mode": "single_pass"}),
        ),
    }


OPERATIONS = list(memory_requests("ns"))


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_a_key_gets_403_on_another_namespace_and_the_memory_is_not_asked(
    make_app, keys_file, backends, operation
):
    verifier, memory, _ = backends
    memory.calls.clear()
    method, path, body = memory_requests("team-b")[operation]
    async with asgi_client(make_app(api_keys_file=str(keys_file))) as client:
        response = await client.request(method, path, json=body, headers=bearer(TEAM_A))
    error = assert_error(response, 403, "permission_error", param="namespace")
    assert error["code"] == "namespace_forbidden"
    assert "team-b" in error["message"] and TEAM_A not in response.text
    assert memory.calls == []


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("key", [TEAM_A, ADMIN])
async def test_a_key_may_use_its_own_namespace(make_app, keys_file, backends, operation, key):
    _, memory, _ = backends
    memory.calls.clear()
    method, path, body = memory_requests("ns")[operation]
    async with asgi_client(make_app(api_keys_file=str(keys_file))) as client:
        response = await client.request(method, path, json=body, headers=bearer(key))
    assert response.status_code in (200, 202), response.text
    assert memory.calls and all(namespace == "ns" for _, namespace in memory.calls)


@pytest.mark.parametrize(
    ("key", "seen"), [(TEAM_A, ["ns"]), (TEAM_B, ["other", "team-b"]), (ADMIN, ["ns", "other", "team-b"])]
)
async def test_a_key_lists_only_the_namespaces_it_may_use(make_app, keys_file, key, seen):
    async with asgi_client(make_app(api_keys_file=str(keys_file))) as client:
        response = await client.get("/memory/namespaces", headers=bearer(key))
        unauthenticated = await client.get("/memory/namespaces")
    assert [n["namespace"] for n in response.json()["namespaces"]] == seen
    assert unauthenticated.status_code == 401


async def test_job_status_is_checked_against_the_jobs_namespace(make_app, keys_file):
    async with asgi_client(make_app(api_keys_file=str(keys_file))) as client:
        own = await client.get("/memory/jobs/job-1", headers=bearer(TEAM_A))
        other = await client.get("/memory/jobs/job-1", headers=bearer(TEAM_B))
    assert own.status_code == 200 and own.json()["namespace"] == "ns"
    error = assert_error(other, 403, "permission_error", param="namespace")
    assert error["code"] == "namespace_forbidden"
    assert "status" not in other.json()  # nothing of the job leaks


async def test_a_job_id_that_could_reach_another_redis_key_is_refused(make_app, backends):
    _, memory, _ = backends
    memory.calls.clear()
    async with asgi_client(make_app()) as client:
        response = await client.get("/memory/jobs/job-1:reflections")
    assert_error(response, 404, "invalid_request_error")
    assert memory.calls == []


async def test_a_bad_namespace_is_400_before_any_permission_check(make_app, keys_file):
    async with asgi_client(make_app(api_keys_file=str(keys_file))) as client:
        response = await client.get("/memory/namespaces/a%0Ab", headers=bearer(TEAM_A))
    assert_error(response, 400, "invalid_request_error", param="namespace")


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_keys_from_aerie_api_keys_and_no_auth_may_use_every_namespace(make_app, keys_file, operation):
    method, path, body = memory_requests("team-b")[operation]
    async with asgi_client(make_app(api_keys="k1,k2", api_keys_file=str(keys_file))) as client:
        with_env_key = await client.request(method, path, json=body, headers=bearer("k2"))
    async with asgi_client(make_app()) as client:
        without_auth = await client.request(method, path, json=body)
    assert with_env_key.status_code in (200, 202), with_env_key.text
    assert without_auth.status_code in (200, 202), without_auth.text


@pytest.mark.parametrize(("headers", "status"), [({}, 401), (bearer("sk-wrong"), 401), (bearer(TEAM_B), 200)])
async def test_metrics_can_require_a_key_while_probes_stay_open(make_app, keys_file, headers, status):
    app = make_app(api_keys_file=str(keys_file), metrics_require_key=True)
    async with asgi_client(app) as client:
        metrics = await client.get("/metrics", headers=headers)
        probes = [await client.get(path) for path in ("/health", "/ready")]
    assert metrics.status_code == status
    if status == 401:
        assert_error(metrics, 401, "authentication_error")
    else:
        assert "aerie:num_requests_running" in metrics.text
    assert [probe.status_code for probe in probes] == [200, 200]


async def test_metrics_are_open_by_default(make_app, keys_file):
    async with asgi_client(make_app(api_keys_file=str(keys_file))) as client:
        assert (await client.get("/metrics")).status_code == 200


def registry(tmp_path: Path, document, suffix: str = ".json", api_keys: str = "") -> KeyRegistry:
    path = tmp_path / f"keys{suffix}"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return KeyRegistry.from_settings(GatewaySettings(api_keys=api_keys, api_keys_file=str(path)))


def test_yaml_keys_file_with_rate_limits(tmp_path):
    keys = registry(
        tmp_path,
        "keys:\n"
        "  - key: sk-yaml-1\n    namespaces: [a, b]\n    rate_limit_rps: 2\n    rate_limit_burst: 5\n"
        "  - key: sk-yaml-2\n    namespaces: ['*']\n",
        suffix=".yaml",
        api_keys="sk-env",
    )
    by_name = {key.name: key for key in keys.keys}
    assert set(by_name) == {"env-key-1", "key-1", "key-2"}
    assert by_name["key-1"].namespaces == {"a", "b"}
    assert (by_name["key-1"].rate_limit_rps, by_name["key-1"].rate_limit_burst) == (2, 5)
    assert by_name["key-2"].namespaces is None and by_name["env-key-1"].namespaces is None
    assert keys.lookup("sk-yaml-1") is by_name["key-1"]
    assert keys.lookup("sk-env") is by_name["env-key-1"]
    assert keys.lookup("sk-yaml-") is None and keys.lookup("sk-yaml-11") is None
    assert [key.digest for key in keys.keys[1:]] == [key_digest("sk-yaml-1"), key_digest("sk-yaml-2")]


def test_no_keys_means_everyone_may_use_everything():
    keys = KeyRegistry.from_settings(GatewaySettings(api_keys=""))
    assert not keys.enabled
    assert keys.authenticate("") is ANYONE and ANYONE.may_use("any-namespace")


SECRET = "sk-do-not-print-me"


@pytest.mark.parametrize(
    ("document", "suffix", "expected"),
    [
        ({"keys": [{"key": SECRET}]}, ".json", "keys[0].namespaces: Field required"),
        ({"keys": [{"key": SECRET, "namespaces": []}]}, ".json", "keys[0].namespaces"),
        ({"keys": [{"key": SECRET, "namespaces": ["a b"]}]}, ".json", "'a b' is not a namespace"),
        ({"keys": [{"key": SECRET, "namespaces": ["a"], "scopes": 1}]}, ".json", "keys[0].scopes"),
        ({"keys": [{"key": SECRET, "namespaces": ["a"], "rate_limit_rps": -1}]}, ".json", "rate_limit_rps"),
        ({"keys": [{"key": f"{SECRET} x", "namespaces": ["a"]}]}, ".json", "visible ASCII"),
        ({"keys": []}, ".json", "keys: List should have at least 1 item"),
        ({"tokens": []}, ".json", "keys: Field required"),
        ([SECRET], ".json", "top level"),
        (f'{{"keys": [{{"key": "{SECRET}", ', ".json", "not valid JSON"),
        (f"keys:\n  - key: {SECRET}\n   namespaces: [a]\n", ".yaml", "not valid YAML"),
        (
            "keys:\n  - key: 12345\n    namespaces: [a]\n",
            ".yml",
            "keys[0].key: Input should be a valid string",
        ),
        (
            {"keys": [{"key": SECRET, "namespaces": ["a"]}, {"key": SECRET, "namespaces": ["b"]}]},
            ".json",
            "configured twice",
        ),
        (
            {
                "keys": [
                    {"key": "k1", "name": "app", "namespaces": ["a"]},
                    {"key": "k2", "name": "app", "namespaces": ["b"]},
                ]
            },
            ".json",
            "names must be unique; repeated: app",
        ),
    ],
)
def test_a_malformed_keys_file_is_a_clear_startup_error_that_never_quotes_a_key(
    tmp_path, document, suffix, expected
):
    with pytest.raises(KeysFileError) as failed:
        registry(tmp_path, document, suffix)
    assert expected in str(failed.value)
    assert SECRET not in str(failed.value)


def test_a_missing_keys_file_stops_the_gateway(tmp_path):
    with pytest.raises(KeysFileError, match="cannot read the keys file"):
        create_app(GatewaySettings(api_keys_file=str(tmp_path / "absent.json")))
