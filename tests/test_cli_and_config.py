"""The `mirror` command as an operator meets it: config validation and a served process.

Bad configuration stops start-up with a message naming the key; environment overrides
apply; a real `mirror serve` process pulls through a credentialed token-auth upstream
and writes one JSON access line per request, with no credential in any line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import PUSHER, PUSHER_PASSWORD, TAG, Upstream
from support.cli import mirror_cli
from support.mirror_process import MirrorProcess
from support.net import free_port, http_request, port_open, wait_until
from support.skopeo import skopeo_copy

from mirror.config import ConfigError, load_config

pytestmark = pytest.mark.slow  # starts registries, servers or processes

ROOT = Path(__file__).resolve().parents[1]


FLEET_SECRET = "a-fleet-secret-0123456789"
FLEET = {"secret": FLEET_SECRET}
REDIS = {"metadata": {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/0"}}


def write_config(path: Path, data: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_example_config_is_valid() -> None:
    result = mirror_cli("check-config", "--config", str(ROOT / "config.example.yaml"))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"listen": "nowhere"}, "listen:"),
        ({"default_upstream": "quay.io"}, "default_upstream"),
        ({"upstreams": {"x": {"url": "ftp://example"}}}, "upstreams.x.url"),
        (
            {"upstreams": {"x": {"url": "https://e", "tag_ttl": "ten minutes"}}},
            "upstreams.x.tag_ttl",
        ),
        ({"upstreams": {"x": {"url": "https://e", "max_stale": "-1s"}}}, "upstreams.x.max_stale"),
        ({"upstreams": {"x": {"url": "https://e", "tls": True}}}, "upstreams.x.tls: unknown key"),
        ({"upstreams": {"x": {"url": "https://e", "username": "u"}}}, "upstreams.x"),
        ({"metadata": {"backend": "redis"}}, "metadata"),
        ({"metadata": {"backend": "etcd"}}, "metadata.backend"),
        ({"storage": {"root": "/x", "size": 1}}, "storage.size: unknown key"),
        ({"cluster": {"listen": "127.0.0.1:5001", "secret": FLEET_SECRET}}, "cluster.listen"),
        ({"cluster": {"listen": "127.0.0.1:0", **FLEET}}, "cluster.listen: needs a fixed port"),
        ({"cluster": {"listen": "127.0.0.1:5000", **FLEET}, **REDIS}, "cluster.listen: port"),
        ({"cluster": {"listen": "127.0.0.1:5001"}, **REDIS}, "cluster: listen needs secret"),
        (
            {"cluster": {"listen": "127.0.0.1:5001", **FLEET, "secret_env": "X"}, **REDIS},
            "cluster: set one of secret, secret_file, secret_env",
        ),
        (
            {"cluster": {"listen": "127.0.0.1:5001", "secret": "short"}, **REDIS},
            "cluster: secret must be at least 16 characters",
        ),
        (
            {"cluster": {"listen": "127.0.0.1:5001", "secret_env": "MIRROR_TEST_UNSET"}, **REDIS},
            "cluster: secret_env: $MIRROR_TEST_UNSET is not set",
        ),
        (
            {"cluster": {"listen": "127.0.0.1:5001", "secret_file": "/nonexistent"}, **REDIS},
            "cluster: secret_file /nonexistent is not readable",
        ),
        ({"cluster": {"listen": "0.0.0.0:5001", **FLEET}, **REDIS}, "set advertise_url"),
        (
            {"cluster": {"listen": "127.0.0.1:5001", "advertise_url": "http://u:p@h:1", **FLEET}},
            "cluster.advertise_url: must not carry credentials",
        ),
        ({"cluster": {"advertise_url": "tcp://h:1"}}, "cluster.advertise_url: must be an http"),
        ({"cluster": {"peer_timeout": "soon"}}, "cluster.peer_timeout"),
        ({"server": {"blob_sendfile": "yes"}}, "server.blob_sendfile"),
    ],
)
def test_bad_config_names_the_key(change: dict[str, object], named: str, tmp_path: Path) -> None:
    data: dict[str, object] = {
        "listen": "127.0.0.1:5000",
        "upstreams": {"docker.io": {"url": "https://registry-1.docker.io"}},
        **change,
    }
    path = write_config(tmp_path / "bad.yaml", data)
    result = mirror_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert named in result.stderr, result.stderr
    result = mirror_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert named in result.stderr


def test_cluster_section_defaults_and_secret_rotation(tmp_path: Path) -> None:
    upstreams = {"x": {"url": "https://e"}}
    assert not load_config(None, upstreams=upstreams).fleet
    secret_file = tmp_path / "secret"
    secret_file.write_text(FLEET_SECRET + "\n")
    config = load_config(
        None,
        upstreams=upstreams,
        cluster={"listen": "127.0.0.1:5001", "secret_file": str(secret_file)},
        **REDIS,
    )
    assert config.fleet
    assert config.cluster.peer_url == "http://127.0.0.1:5001"
    assert config.cluster.peer_timeout == 10.0
    assert config.cluster.secret_value() == FLEET_SECRET
    secret_file.write_text("rotated-secret-0123456789")
    assert config.cluster.secret_value() == "rotated-secret-0123456789"
    advertised = load_config(
        None,
        upstreams=upstreams,
        cluster={
            "listen": "0.0.0.0:5001",
            "advertise_url": "http://10.0.0.5:5001/",
            "secret": FLEET_SECRET,
            "peer_timeout": "2s",
        },
        **REDIS,
    )
    assert advertised.cluster.peer_url == "http://10.0.0.5:5001"
    assert advertised.cluster.peer_timeout == 2.0
    assert FLEET_SECRET not in repr(advertised)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    result = mirror_cli("check-config", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "cannot read config file" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("listen: [unclosed", encoding="utf-8")
    result = mirror_cli("check-config", "--config", str(broken))
    assert result.returncode == 2
    assert "not valid YAML" in result.stderr


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(
        tmp_path / "c.yaml",
        {"upstreams": {"docker.io": {"url": "https://registry-1.docker.io", "tag_ttl": "10m"}}},
    )
    monkeypatch.setenv("MIRROR_LISTEN", "127.0.0.1:6123")
    monkeypatch.setenv("MIRROR_STORAGE__ROOT", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("MIRROR_UPSTREAMS__DOCKER.IO__TAG_TTL", "90s")
    monkeypatch.setenv("MIRROR_SERVER__BLOB_SENDFILE", "remote")
    config = load_config(path)
    assert config.server.blob_sendfile == "remote"
    assert config.listen_address == ("127.0.0.1", 6123)
    assert config.storage.root == tmp_path / "elsewhere"
    assert config.upstreams["docker.io"].tag_ttl == 90
    assert config.upstreams["docker.io"].url == "https://registry-1.docker.io"
    # Flags (load_config's keyword values) win over the environment, key by key.
    flagged = load_config(path, listen="127.0.0.1:6124", storage={"max_size": "1GiB"})
    assert flagged.listen_address == ("127.0.0.1", 6124)
    assert flagged.storage.root == tmp_path / "elsewhere"
    assert flagged.storage.max_size == 1024**3
    monkeypatch.setenv("MIRROR_UPSTREAMS__DOCKER.IO__MAX_STALE", "soon")
    with pytest.raises(ConfigError, match=r"upstreams\.docker\.io\.max_stale"):
        load_config(path)


@pytest.mark.parametrize(
    ("file_offline", "env", "flags", "serves_on", "offline"),
    [
        (True, {}, (), "file", True),
        (True, {"MIRROR_LISTEN": "env", "MIRROR_OFFLINE": "false"}, (), "env", False),
        (False, {"MIRROR_OFFLINE": "true"}, (), "file", True),
        (
            False,
            {"MIRROR_LISTEN": "env", "MIRROR_OFFLINE": "false"},
            ("--listen", "flag", "--offline"),
            "flag",
            True,
        ),
        (False, {}, ("--listen", "flag", "--offline"), "flag", True),
    ],
    ids=["file", "env-over-file", "env-over-file-offline", "flags-over-env", "flags-over-file"],
)
def test_flags_beat_environment_beats_file(
    tmp_path: Path,
    file_offline: bool,
    env: dict[str, str],
    flags: tuple[str, ...],
    serves_on: str,
    offline: bool,
) -> None:
    """`mirror serve` with listen and offline set in up to three layers; the port it
    answers on and whether it asks its upstream show which layer won."""
    ports = {layer: free_port() for layer in ("file", "env", "flag")}

    def address(value: str) -> str:
        return f"127.0.0.1:{ports[value]}" if value in ports else value

    closed_upstream = f"http://127.0.0.1:{free_port()}"  # online, a miss fails upstream
    with MirrorProcess(
        tmp_path / "mirror",
        {"reg.test": {"url": closed_upstream}},
        port=ports[serves_on],  # where start() waits for /healthz
        listen=address("file"),
        offline=file_offline,
        default_upstream="reg.test",
        env={key: address(value) for key, value in env.items()},
        extra_args=tuple(address(arg) for arg in flags),
    ) as process:
        for layer, port in ports.items():
            assert port_open("127.0.0.1", port) == (layer == serves_on), layer
        response = http_request("GET", f"{process.url}/v2/app/manifests/1")
    body = json.loads(response.body)
    if offline:
        assert response.status == 404
        assert "offline" in body["errors"][0]["message"]
    else:
        assert response.status in (502, 503)
        assert body["errors"][0]["code"] == "UNAVAILABLE"


def test_durations_and_listen_forms(tmp_path: Path) -> None:
    config = load_config(
        None,
        listen="[::1]:5000",
        upstreams={"a": {"url": "http://127.0.0.1:1", "tag_ttl": "1h30m", "max_stale": 45}},
    )
    assert config.listen_address == ("::1", 5000)
    assert config.upstreams["a"].tag_ttl == 5400
    assert config.upstreams["a"].max_stale == 45


@pytest.fixture
def served_mirror(tmp_path: Path, token_upstream: Upstream) -> Iterator[MirrorProcess]:
    """`mirror serve` as a process, with the token upstream's credentials from a file."""
    secret = tmp_path / "password"
    secret.write_text(PUSHER_PASSWORD + "\n", encoding="utf-8")
    upstreams = {
        "private": {"url": token_upstream.url, "username": PUSHER, "password_file": str(secret)}
    }
    with MirrorProcess(tmp_path / "mirror", upstreams, log_level="debug") as process:
        yield process


def test_served_process_pulls_with_credentials_and_logs_cleanly(
    served_mirror: MirrorProcess, token_upstream: Upstream, tmp_path: Path
) -> None:
    host, log_path, data = served_mirror.host, served_mirror.log_path, served_mirror.storage
    tokens = token_upstream.token_server
    assert tokens is not None
    before = len(tokens.requests)
    skopeo_copy(f"docker://{host}/{Upstream.repo('oci')}:{TAG}", f"dir:{tmp_path / 'out'}")
    assert (tmp_path / "out" / "manifest.json").read_bytes() == token_upstream.images[
        "oci"
    ].manifest

    asked = tokens.requests[before:]
    assert asked
    assert all(request.username == PUSHER and request.authorized for request in asked)

    # Every line is JSON; the access lines say what happened; no credential anywhere.
    wait_until(lambda: b'"event": "request"' in log_path.read_bytes(), timeout=10)
    text = log_path.read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    access = [line for line in lines if line.get("event") == "request"]
    manifest_lines = [line for line in access if "/manifests/" in line["path"]]
    assert manifest_lines
    for line in manifest_lines:
        for field in (
            "request_id",
            "method",
            "upstream",
            "repository",
            "reference",
            "cache",
            "status",
            "bytes",
            "seconds",
        ):
            assert field in line, field
        assert line["upstream"] == "private"
        assert line["repository"] == Upstream.repo("oci")
    assert {line["cache"] for line in access if "/blobs/" in line["path"]} == {"miss"}
    assert PUSHER_PASSWORD not in text
    assert "eyJ" not in text  # how every JWT (the upstream's tokens) begins
    assert "cHVzaGVy" not in text  # base64 of the username, as in a Basic header
    assert (data / "tmp").exists()


def test_client_config_outputs(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "m.yaml",
        {
            "listen": "0.0.0.0:5000",
            "default_upstream": "docker.io",
            "upstreams": {
                "docker.io": {
                    "url": "https://registry-1.docker.io",
                    "aliases": ["index.docker.io"],
                },
                "quay.io": {"url": "https://quay.io"},
            },
        },
    )
    mirror = "http://mirror.internal:5000"
    result = mirror_cli(
        "client-config",
        "docker",
        "--config",
        str(config),
        "--mirror-url",
        mirror,
        "--output",
        str(tmp_path / "docker"),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "docker" / "daemon.json").read_text()) == {
        "registry-mirrors": [mirror],
        "insecure-registries": ["mirror.internal:5000"],
    }

    result = mirror_cli(
        "client-config",
        "containerd",
        "--config",
        str(config),
        "--mirror-url",
        mirror,
        "--fallback",
        "none",
        "--output",
        str(tmp_path / "certs.d"),
    )
    assert result.returncode == 0, result.stderr
    hosts = sorted(p.parent.name for p in (tmp_path / "certs.d").glob("*/hosts.toml"))
    assert hosts == ["docker.io", "index.docker.io", "quay.io"]
    quay = (tmp_path / "certs.d" / "quay.io" / "hosts.toml").read_text()
    assert f'server = "{mirror}"' in quay  # no fallback: the mirror is the server

    result = mirror_cli("client-config", "podman", "--config", str(config), "--mirror-url", mirror)
    assert result.returncode == 0, result.stderr
    assert 'prefix = "quay.io"' in result.stdout
    assert 'location = "mirror.internal:5000/quay.io"' in result.stdout

    result = mirror_cli("client-config", "podman", "--config", str(config), "--fallback", "ftp://x")
    assert result.returncode == 2


@pytest.mark.parametrize(
    ("mirror", "fallback", "registry_location", "registry_insecure", "mirror_insecure"),
    [
        ("http://m:5000", "upstream", "plain.test:5000", True, True),
        ("https://m", "upstream", "plain.test:5000", True, False),
        ("http://m:5000", "none", "m:5000/plain.test", True, None),
        ("https://m", "none", "m/plain.test", False, None),
        ("https://m", "http://fallback.test:81", "fallback.test:81", True, False),
        ("http://m:5000", "https://fallback.test", "fallback.test", False, True),
    ],
)
def test_podman_marks_every_http_location_insecure(
    tmp_path: Path,
    mirror: str,
    fallback: str,
    registry_location: str,
    registry_insecure: bool,
    mirror_insecure: bool | None,
) -> None:
    config = write_config(
        tmp_path / "m.yaml",
        {
            "upstreams": {
                "plain.test": {"url": "http://plain.test:5000"},
                "tls.test": {"url": "https://tls.test"},
            }
        },
    )
    result = mirror_cli(
        "client-config",
        "podman",
        "--config",
        str(config),
        "--mirror-url",
        mirror,
        "--fallback",
        fallback,
        "--output",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out" / "registry-mirror.conf", "rb") as file:
        registries = {entry["prefix"]: entry for entry in tomllib.load(file)["registry"]}
    plain = registries["plain.test"]
    assert plain["location"] == registry_location
    assert plain["insecure"] is registry_insecure
    if mirror_insecure is None:
        assert "mirror" not in plain
    else:
        mirror_host = mirror.split("://", 1)[1]
        assert plain["mirror"] == [
            {"location": f"{mirror_host}/plain.test", "insecure": mirror_insecure}
        ]
    # An https upstream stays secure when it is the fallback.
    if fallback == "upstream":
        assert registries["tls.test"]["location"] == "tls.test"
        assert registries["tls.test"]["insecure"] is False


def test_json_log_lines_carry_the_traceback_of_a_logged_exception() -> None:
    # In a child process: logging is configured once per process, for the whole of it.
    program = (
        "import structlog\n"
        "from mirror.logging import configure_logging\n"
        "configure_logging('info', 'json')\n"
        "try:\n"
        "    raise KeyError('ContentLength')\n"
        "except KeyError:\n"
        "    structlog.get_logger('t').exception('unhandled_error')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30, check=True
    )
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert line["event"] == "unhandled_error"
    assert "KeyError: 'ContentLength'" in line["exception"]
