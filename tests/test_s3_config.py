"""`storage.backend` and `storage.s3`: defaults, validation errors that name the key,
the secret key's three sources (resolved at use, never shown), environment overrides.
Pure logic: no socket."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror.config import ConfigError, load_config

UPSTREAMS = {"x": {"url": "https://e"}}
SECRET = "s3-secret-never-shown"


def test_filesystem_is_the_default_backend() -> None:
    config = load_config(None, upstreams=UPSTREAMS)
    assert config.storage.backend == "filesystem"
    assert config.storage.s3 is None


def test_s3_defaults_and_normalised_prefix() -> None:
    config = load_config(
        None,
        upstreams=UPSTREAMS,
        storage={"backend": "s3", "s3": {"bucket": "blobs", "prefix": "/team/mirror"}},
    )
    s3 = config.storage.s3
    assert s3 is not None
    assert (s3.endpoint, s3.region, s3.path_style) == (None, "us-east-1", False)
    assert s3.prefix == "team/mirror/"
    assert s3.multipart_chunk == 16 * 1024 * 1024
    assert (s3.redirect, s3.redirect_expiry, s3.create_bucket) == (False, 1200.0, False)
    assert s3.credentials() is None  # the standard AWS chain


def test_s3_sizes_and_durations_parse_like_other_keys() -> None:
    config = load_config(
        None,
        upstreams=UPSTREAMS,
        storage={
            "backend": "s3",
            "s3": {
                "bucket": "blobs",
                "endpoint": "http://127.0.0.1:8333/",
                "multipart_chunk": "8MiB",
                "redirect_expiry": "5m",
            },
        },
    )
    s3 = config.storage.s3
    assert s3 is not None
    assert s3.multipart_chunk == 8 * 1024 * 1024
    assert s3.redirect_expiry == 300.0
    assert s3.endpoint == "http://127.0.0.1:8333"


@pytest.mark.parametrize(
    ("storage", "named"),
    [
        ({"backend": "s3"}, "storage: backend s3 needs the storage.s3 section"),
        ({"backend": "s3", "s3": {}}, "storage.s3.bucket: Field required"),
        ({"backend": "gcs"}, "storage.backend"),
        (
            {"backend": "s3", "s3": {"bucket": "b1b", "multipart_chunk": "4MiB"}},
            "storage.s3.multipart_chunk: must be at least 5MiB",
        ),
        ({"backend": "s3", "s3": {"bucket": "Not_A_Bucket"}}, "storage.s3.bucket"),
        (
            {"backend": "s3", "s3": {"bucket": "b1b", "endpoint": "s3.example.com"}},
            "storage.s3.endpoint",
        ),
        (
            {"backend": "s3", "s3": {"bucket": "b1b", "access_key": "AK"}},
            "storage.s3: access_key needs secret_key",
        ),
        (
            {"backend": "s3", "s3": {"bucket": "b1b", "secret_key": SECRET}},
            "storage.s3: secret_key needs access_key",
        ),
        (
            {
                "backend": "s3",
                "s3": {"bucket": "b1b", "access_key": "AK", "secret_key_env": "NO_SUCH_VAR_S3"},
            },
            "storage.s3: secret_key_env: $NO_SUCH_VAR_S3 is not set",
        ),
        (
            {
                "backend": "s3",
                "s3": {"bucket": "b1b", "access_key": "AK", "secret_key_file": "/nonexistent"},
            },
            "storage.s3: secret_key_file /nonexistent is not readable",
        ),
        (
            {
                "backend": "s3",
                "s3": {
                    "bucket": "b1b",
                    "access_key": "AK",
                    "secret_key": "a",
                    "secret_key_env": "B",
                },
            },
            "storage.s3: set one of secret_key, secret_key_file, secret_key_env",
        ),
        ({"backend": "s3", "s3": {"bucket": "b1b", "redirect_expiry": "8d"}}, "redirect_expiry"),
    ],
)
def test_bad_s3_settings_name_their_key(storage: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, upstreams=UPSTREAMS, storage=storage)
    assert named in str(caught.value)
    assert SECRET not in str(caught.value)


def test_secret_key_from_file_env_or_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "s3-secret"
    secret_file.write_text(SECRET + "\n")
    monkeypatch.setenv("TEST_S3_SECRET", SECRET + "-env")
    sources = {
        "secret_key_file": (str(secret_file), SECRET),
        "secret_key_env": ("TEST_S3_SECRET", SECRET + "-env"),
        "secret_key": (SECRET + "-inline", SECRET + "-inline"),
    }
    for key, (value, expected) in sources.items():
        config = load_config(
            None,
            upstreams=UPSTREAMS,
            storage={"backend": "s3", "s3": {"bucket": "b1b", "access_key": "AK", key: value}},
        )
        assert config.storage.s3 is not None
        assert config.storage.s3.credentials() == ("AK", expected)
        assert SECRET not in repr(config)
    # A file is read at each use, so the secret may be rotated without a restart.
    rotated = load_config(
        None,
        upstreams=UPSTREAMS,
        storage={
            "backend": "s3",
            "s3": {"bucket": "b1b", "access_key": "AK", "secret_key_file": str(secret_file)},
        },
    )
    secret_file.write_text("rotated")
    assert rotated.storage.s3 is not None
    assert rotated.storage.s3.credentials() == ("AK", "rotated")


def test_environment_overrides_reach_the_s3_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRROR_STORAGE__BACKEND", "s3")
    monkeypatch.setenv("MIRROR_STORAGE__S3__BUCKET", "from-env")
    monkeypatch.setenv("MIRROR_STORAGE__S3__PATH_STYLE", "true")
    monkeypatch.setenv("MIRROR_STORAGE__S3__MULTIPART_CHUNK", "6MiB")
    config = load_config(None, upstreams=UPSTREAMS, storage={"s3": {"region": "eu-west-1"}})
    s3 = config.storage.s3
    assert config.storage.backend == "s3"
    assert s3 is not None
    assert (s3.bucket, s3.region, s3.path_style) == ("from-env", "eu-west-1", True)
    assert s3.multipart_chunk == 6 * 1024 * 1024
