"""Everything under deploy/ is checked here so it cannot rot: the Dockerfile (hadolint),
the compose files (the Compose specification's schema), the Kubernetes manifests (the
Kubernetes schemas, and kustomize builds), the systemd unit (systemd-analyze), every
mirror configuration they carry (`mirror check-config`), and the configuration
reference in the README against the config model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel
from support.cli import containerd_hosts, mirror_cli

from mirror.config import MirrorConfig

pytestmark = pytest.mark.slow  # starts registries, servers or processes

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
COMPOSE_WHEEL = "docker-compose==1.29.2"  # ships the Compose specification's JSON schema


def run(*argv: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False, **kwargs
    )


# Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    result = run(BIN / "hadolint", DEPLOY / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\nRUN apt-get install curl\n")
    assert run(BIN / "hadolint", broken).returncode != 0


def test_dockerfile_copies_what_exists_and_dockerignore_keeps_it() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path
    assert "HEALTHCHECK" in text
    assert "/healthz" in text
    assert re.search(r"^USER \d+", text, re.MULTILINE), "the image must not run as root"
    ignored = (ROOT / ".dockerignore").read_text()
    for kept in ("!pyproject.toml", "!README.md", "!mirror/", "!deploy/docker/"):
        assert kept in ignored


# Compose


@pytest.fixture(scope="session")
def compose_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cache = ROOT / ".cache" / "compose-schema"
    wheels = list(cache.glob("docker_compose-*.whl")) if cache.exists() else []
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        fetched = run(
            sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", cache, COMPOSE_WHEEL
        )
        assert fetched.returncode == 0, fetched.stderr
        wheels = list(cache.glob("docker_compose-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        schema: dict[str, Any] = json.loads(wheel.read("compose/config/compose_spec.json"))
    return schema


COMPOSE_FILES = sorted((DEPLOY / "compose").glob("compose*.yaml"))


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_spec(path: Path, compose_schema: dict[str, Any]) -> None:
    document = yaml.safe_load(path.read_text())
    jsonschema.Draft201909Validator(compose_schema).validate(document)
    for service in document["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (path.parent / source).exists(), source
        build = service.get("build")
        if build:
            context = path.parent / build["context"]
            assert (context / build["dockerfile"]).exists()
    # compose.yaml: one mirror; the others (replicas, s3) show two sharing a store.
    assert len([s for s in document["services"] if s.startswith("mirror")]) == (
        1 if path.name == "compose.yaml" else 2
    )


def test_the_compose_schema_really_validates(compose_schema: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(compose_schema).validate(
            {"services": {"mirror": {"ports": "5000"}}}
        )


# Kubernetes


def kubernetes_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") not in ("Kustomization", "Component"):
                yield path, document


def _is_patch(path: Path, document: dict[str, Any]) -> bool:
    # Overlay and component patches are partial by design; they are checked in the
    # kustomize builds.
    return ("overlays" in path.parts or "components" in path.parts) and (
        "$patch" in document
        or ("spec" not in document and document["kind"] != "ConfigMap")
        or path.name in ("replicas.yaml", "configmap.yaml", "statefulset.yaml")
    )


def validate_manifests(files: list[Path]) -> subprocess.CompletedProcess[str]:
    return run(BIN / "kubernetes-validate", "--strict", "--quiet", *files)


def test_kubernetes_manifests_match_the_schemas() -> None:
    files = sorted(
        {path for path, document in kubernetes_documents() if not _is_patch(path, document)}
    )
    assert len(files) >= 8
    result = validate_manifests(files)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "directory",
    [
        "base",
        "overlays/replicas-redis",
        "overlays/replicas-sentinel",
        "overlays/replicas-s3",
        "overlays/node-local",
        "node-config",
    ],
)
def test_kustomize_builds_valid_manifests(directory: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed; each file is validated above")
    built = run(kubectl, "kustomize", DEPLOY / "kubernetes" / directory)
    assert built.returncode == 0, built.stderr
    output = tmp_path / "built.yaml"
    output.write_text(built.stdout)
    result = validate_manifests([output])
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(built.stdout) if d}
    expected = {
        "base": {"Namespace", "ConfigMap", "StatefulSet", "Service", "PodDisruptionBudget"},
        "overlays/replicas-redis": {
            "StatefulSet",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy",
        },
        "overlays/replicas-sentinel": {
            "StatefulSet",
            "ConfigMap",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy",
        },
        "overlays/replicas-s3": {
            "StatefulSet",
            "ConfigMap",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy",
        },
        "overlays/node-local": {"DaemonSet", "ConfigMap", "Deployment", "Service"},
        "node-config": {"DaemonSet", "ConfigMap"},
    }[directory]
    assert expected <= kinds
    if directory == "overlays/node-local":
        assert "StatefulSet" not in kinds


def test_kubernetes_validate_really_validates(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replicas: many}\n"
    )
    assert validate_manifests([broken]).returncode != 0


def test_probes_point_at_health_endpoints() -> None:
    paths = set()
    for _, document in kubernetes_documents():
        for container in (
            document.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        ):
            for probe in ("readinessProbe", "livenessProbe"):
                http_get = container.get(probe, {}).get("httpGet")
                if http_get:
                    paths.add(http_get["path"])
    assert paths == {"/healthz", "/readyz"}


# Every mirror configuration shipped must pass check-config


def shipped_configs() -> Iterator[tuple[str, str]]:
    for path, document in kubernetes_documents():
        if document["kind"] == "ConfigMap" and "mirror.yaml" in document.get("data", {}):
            yield f"{path.relative_to(ROOT)}", document["data"]["mirror.yaml"]
    for path in (
        DEPLOY / "compose" / "mirror.yaml",
        DEPLOY / "compose" / "mirror.s3.yaml",
        DEPLOY / "docker" / "mirror.yaml",
    ):
        yield str(path.relative_to(ROOT)), path.read_text()
    yield "config.example.yaml", (ROOT / "config.example.yaml").read_text()


POD_IP = "10.0.0.7"


def pod_environment(text: str, tmp_path: Path) -> dict[str, str]:
    """What a pod or container adds to its config: for a fleet, the advertise URL from
    the pod IP and the Secret mounted at cluster.secret_file; for S3, the Secret mounted
    at storage.s3.secret_key_file or the variable secret_key_env names (here files and
    values the test makes, as `kubectl create secret` or compose would).
    test_fleet_workloads_supply_what_the_config_needs and
    test_s3_workloads_supply_what_the_config_needs check that the workloads really do."""
    config = yaml.safe_load(text) or {}
    environment = {}
    cluster = config.get("cluster") or {}
    if "listen" in cluster:
        secret = tmp_path / "secret"
        secret.write_text("s3cret-of-the-fleet-0123456789\n")
        port = cluster["listen"].rsplit(":", 1)[1]
        environment |= {
            "MIRROR_CLUSTER__SECRET_FILE": str(secret),
            "MIRROR_CLUSTER__ADVERTISE_URL": f"http://{POD_IP}:{port}",
        }
    s3 = (config.get("storage") or {}).get("s3") or {}
    if "secret_key_file" in s3:
        key_file = tmp_path / "secret-key"
        key_file.write_text("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n")
        environment["MIRROR_STORAGE__S3__SECRET_KEY_FILE"] = str(key_file)
    if "secret_key_env" in s3:
        environment[s3["secret_key_env"]] = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    return environment


@pytest.mark.parametrize(("name", "text"), list(shipped_configs()), ids=lambda v: str(v)[:60])
def test_shipped_mirror_configs_pass_check_config(name: str, text: str, tmp_path: Path) -> None:
    path = tmp_path / "mirror.yaml"
    path.write_text(text)
    result = mirror_cli("check-config", "--config", path, env=pod_environment(text, tmp_path))
    assert result.returncode == 0, f"{name}: {result.stderr}"


def test_a_fleet_config_without_the_pods_environment_is_refused(tmp_path: Path) -> None:
    # The environment above is needed: without the Secret or the pod IP, no start.
    text = (DEPLOY / "kubernetes/overlays/replicas-redis/configmap.yaml").read_text()
    path = tmp_path / "mirror.yaml"
    path.write_text(yaml.safe_load(text)["data"]["mirror.yaml"])
    environment = pod_environment(path.read_text(), tmp_path)
    for missing in environment:
        partial = {k: v for k, v in environment.items() if k != missing}
        result = mirror_cli("check-config", "--config", path, env=partial)
        assert result.returncode != 0
        assert "cluster" in result.stderr


def pod_volumes(workload: dict[str, Any]) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = workload["spec"]["template"]["spec"].get("volumes", [])
    return volumes


@pytest.mark.parametrize(
    "directory",
    [
        "overlays/replicas-redis",
        "overlays/replicas-sentinel",
        "overlays/replicas-s3",
        "overlays/node-local",
    ],
)
def test_fleet_workloads_supply_what_the_config_needs(directory: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    built = run(kubectl, "kustomize", DEPLOY / "kubernetes" / directory)
    assert built.returncode == 0, built.stderr
    documents = [d for d in yaml.safe_load_all(built.stdout) if d]
    (config_map,) = [d for d in documents if d["metadata"]["name"] == "mirror-config"]
    config = yaml.safe_load(config_map["data"]["mirror.yaml"])
    assert config["metadata"]["backend"] == "redis"
    listen_port = int(config["cluster"]["listen"].rsplit(":", 1)[1])
    secret_file = Path(config["cluster"]["secret_file"])
    (workload,) = [
        d
        for d in documents
        if d["kind"] in ("StatefulSet", "DaemonSet")
        and {"name": "mirror-config"} in [v.get("configMap") for v in pod_volumes(d)]
    ]
    pod = workload["spec"]["template"]["spec"]
    (mirror,) = [c for c in pod["containers"] if c["name"] == "mirror"]
    env = {e["name"]: e for e in mirror["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["MIRROR_CLUSTER__ADVERTISE_URL"]["value"] == f"http://$(POD_IP):{listen_port}"
    # Kubernetes expands $(POD_IP) only from variables declared before it.
    names = [e["name"] for e in mirror["env"]]
    assert names.index("POD_IP") < names.index("MIRROR_CLUSTER__ADVERTISE_URL")
    ports = {p["name"]: p["containerPort"] for p in mirror["ports"]}
    assert ports["peer"] == listen_port
    # The Secret is mounted where secret_file points, its key as the file's name.
    secret_volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    mounts = {Path(m["mountPath"]): m["name"] for m in mirror["volumeMounts"]}
    assert secret_file.parent in mounts
    assert secret_volumes[mounts[secret_file.parent]]["secretName"] == "registry-mirror-cluster"
    assert secret_file.name == "secret"  # kubectl create secret ... --from-literal=secret=
    # No shared volume: each replica its own disk.
    for claim in workload["spec"].get("volumeClaimTemplates", []):
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    if pod.get("hostNetwork"):
        return  # NetworkPolicy does not apply to host-network pods (see the overlay)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    (policy,) = [d for d in documents if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    rules = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
    assert set(rules) == {"http", "peer"}
    assert "from" not in rules["http"]  # clients come from anywhere
    assert rules["peer"]["from"] == [{"podSelector": {"matchLabels": labels}}]


@pytest.mark.parametrize("directory", ["overlays/replicas-s3"])
def test_s3_workloads_supply_what_the_config_needs(directory: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    built = run(kubectl, "kustomize", DEPLOY / "kubernetes" / directory)
    assert built.returncode == 0, built.stderr
    documents = [d for d in yaml.safe_load_all(built.stdout) if d]
    (config_map,) = [d for d in documents if d["metadata"]["name"] == "mirror-config"]
    config = yaml.safe_load(config_map["data"]["mirror.yaml"])
    storage = config["storage"]
    assert storage["backend"] == "s3"
    # Replicas on one bucket share the lease and the access times through Redis.
    assert config["metadata"]["backend"] == "redis"
    (workload,) = [d for d in documents if d["kind"] == "StatefulSet"]
    assert "volumeClaimTemplates" not in workload["spec"], "a stateless replica has no claim"
    pod = workload["spec"]["template"]["spec"]
    (mirror,) = [c for c in pod["containers"] if c["name"] == "mirror"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in mirror["volumeMounts"]}
    # storage.root (temp files, ledger) on an emptyDir, nothing persistent.
    assert "emptyDir" in volumes[mounts[storage["root"]]]
    assert not [v for v in volumes.values() if "persistentVolumeClaim" in v]
    # The secret key: the registry-mirror-s3 Secret's key `secret-key`, where
    # secret_key_file points.
    key_file = Path(storage["s3"]["secret_key_file"])
    secret_volume = volumes[mounts[str(key_file.parent)]]
    assert secret_volume["secret"]["secretName"] == "registry-mirror-s3"
    assert key_file.name == "secret-key"  # kubectl create secret ... --from-literal=secret-key=


def test_node_config_matches_client_config_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_local = yaml.safe_load(
        (DEPLOY / "kubernetes/overlays/node-local/configmap.yaml").read_text()
    )
    config = tmp_path / "mirror.yaml"
    config.write_text(node_local["data"]["mirror.yaml"])
    for name, value in pod_environment(config.read_text(), tmp_path).items():
        monkeypatch.setenv(name, value)  # containerd_hosts' subprocess inherits it
    out = containerd_hosts(config, "http://127.0.0.1:5000", tmp_path / "certs.d")
    generated = {p.parent.name: p.read_text() for p in out.glob("*/hosts.toml")}
    shipped = yaml.safe_load((DEPLOY / "kubernetes/node-config/hosts-configmap.yaml").read_text())
    assert shipped["data"] == generated


# systemd


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (DEPLOY / "systemd" / "registry-mirror.service").read_text()
    assert "ProtectSystem=strict" in unit
    assert "NoNewPrivileges=yes" in unit
    assert "StateDirectory=registry-mirror" in unit
    assert "DynamicUser=yes" in unit
    # systemd-analyze insists the executable exists: point it at this checkout's.
    local = tmp_path / "registry-mirror.service"
    local.write_text(unit.replace("/opt/registry-mirror/bin/mirror", str(BIN / "mirror")))
    result = run(analyze, "verify", "--man=no", local)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""  # warnings (unknown keys...) count too
    broken = tmp_path / "broken.service"
    broken.write_text(local.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    assert "Unknown key" in run(analyze, "verify", "--man=no", broken).stderr


# The configuration reference


def model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        nested = _models_in(annotation)
        if name == "upstreams":
            keys |= model_keys(_upstream_model(), "upstreams.<name>.")
        elif nested and name not in ("tag_rules", "rules"):
            for model in nested:
                keys |= model_keys(model, f"{key}.")
        else:
            keys.add(key)
    return keys


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    # An optional section (`S3Config | None`) or a tagged union (`credentials`): the keys
    # of each member are documented one by one.
    return [
        member
        for member in getattr(annotation, "__args__", ())
        if isinstance(member, type) and issubclass(member, BaseModel)
    ]


def _upstream_model() -> type[BaseModel]:
    from mirror.config import UpstreamConfig

    return UpstreamConfig


def readme_keys() -> set[str]:
    """The keys in the README's configuration table (its first column, in backticks)."""
    text = (ROOT / "README.md").read_text()
    table = text.split("| key | default | meaning |", 1)[1].split("\n\n", 1)[0]
    return {
        key for row in table.splitlines()[2:] for key in re.findall(r"`([^`]+)`", row.split("|")[1])
    }


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    in_model = model_keys(MirrorConfig)
    in_readme = readme_keys()
    assert in_model - in_readme == set(), "in the config model but not in the README"
    assert in_readme - in_model == set(), "in the README but not in the config model"
    example = (ROOT / "config.example.yaml").read_text()
    for key in in_model:
        leaf = key.rsplit(".", 1)[-1]
        assert re.search(rf"^\s*#?\s*{re.escape(leaf)}:", example, re.MULTILINE), (
            f"{key} is not in config.example.yaml"
        )
