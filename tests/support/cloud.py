"""Cloud credential sources emulated locally: ECR's token API on moto's server, and a
Google service-account key whose token endpoint is the test's own."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .net import free_port


@contextlib.contextmanager
def moto_ecr_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """moto's server on a loopback port; its GetAuthorizationToken is wrapped to hand
    out a new password per call, valid `lifetime` seconds (moto's own is fixed and
    expired in 2015), and to record each call."""
    from moto.core.responses import ActionResult
    from moto.ecr.responses import ECRResponse
    from moto.server import ThreadedMotoServer

    # Long enough that two pulls on a loaded machine fit well inside the first half.
    issued: dict[str, Any] = {"calls": [], "lifetime": 12.0, "on_issue": None}

    def get_authorization_token(self: ECRResponse) -> ActionResult:
        now = time.time()
        password = f"ecr-token-{len(issued['calls']) + 1}"
        expires = now + issued["lifetime"]
        issued["calls"].append((now, expires, password))
        if issued["on_issue"] is not None:
            issued["on_issue"](password)
        token = base64.b64encode(f"AWS:{password}".encode()).decode()
        return ActionResult(
            {
                "authorizationData": [
                    {
                        "authorizationToken": token,
                        "expiresAt": datetime.fromtimestamp(expires, UTC),
                        "proxyEndpoint": "https://123456789012.dkr.ecr.us-east-1.amazonaws.com",
                    }
                ]
            }
        )

    monkeypatch.setattr(ECRResponse, "get_authorization_token", get_authorization_token)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    issued["url"] = f"http://127.0.0.1:{port}"
    try:
        yield issued
    finally:
        server.stop()


def service_account_key(path: Path, token_uri: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "mirror-tests",
                "private_key_id": "test-key",
                "private_key": pem,
                "client_email": "puller@mirror-tests.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": token_uri,
            }
        )
    )
