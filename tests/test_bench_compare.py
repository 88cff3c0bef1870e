"""bench/compare.py cannot rot silently: its arguments, wrk parsing, nginx config and table
run on canned figures here; its blob reader meets a server that lies about the length; and
a tiny real run (8 MiB blob, 1 s of wrk) starts every server and prints the whole table.
The figures themselves come from the full-size run, never from a test."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import compare

WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:5000/v2/a/manifests/v1
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.10ms    1.20ms  20.00ms   90.00%
    Req/Sec     1.98k   100.00     2.10k    80.00%
  1984 requests in 1.00s, 2.50MB read
Requests/sec:   1979.53
Transfer/sec:      2.49MB
"""


def canned_figures() -> compare.Figures:
    return {
        "nginx": {"streams_8_gbps": 3.0, "cpu_s_per_gb": 0.2, "manifest_digest_rps": 20000.0},
        "distribution": {
            "streams_8_gbps": 2.0,
            "manifest_tag_rps": 1000.0,
            "cold_vs_direct": 2.25,
            "rss_peak_mib": 213.0,
        },
        "mirror": {
            "streams_8_gbps": 2.88,
            "cpu_s_per_gb": 0.5,
            "manifest_tag_rps": 3000.0,
            "manifest_digest_rps": 4100.0,
            "cold_vs_direct": 1.05,
            "rss_peak_mib": 130.0,
        },
    }


def test_defaults_are_the_issue_figures() -> None:
    args = compare.parse_args([])
    assert (args.blob_mb, args.streams, args.rss_streams, args.layer_mb) == (1024, 8, 32, 40)
    assert args.only == compare.SECTIONS
    assert compare.parse_args(["--only", "cold, rss"]).only == ("cold", "rss")
    assert args.repeat == 1


@pytest.mark.parametrize(
    "argv", [["--only", "speed"], ["--only", ","], ["--streams", "0"], ["--repeat", "0"]]
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        compare.parse_args(argv)
    assert exc.value.code == 2


def test_the_table_gives_ratios_goals_and_whether_each_is_met() -> None:
    config = compare.settings(compare.parse_args([]))
    headers, rows, summary = compare.table(canned_figures(), config)
    assert headers[1:4] == ["nginx", "distribution", "mirror"]
    by_label = {row[0]: row for row in rows}
    streams = by_label["warm 1 GiB blob, 8 streams, aggregate GB/s"]
    assert streams[1:] == ["3.00", "2.00", "2.88", "0.96x", "1.44x", ">= 0.95x nginx", "yes"]
    assert by_label["manifest GET by tag, req/s (wrk -t1 -c16)"][-1] == "NO"
    assert by_label["manifest GET by digest, req/s (wrk -t1 -c16)"][-1] == "yes"
    assert by_label["cold pull / direct pull (x)"][-1] == "yes"
    rss = by_label["peak RSS, 32 warm 1 GiB streams, MiB"]
    assert rss[1:] == ["-", "213", "130", "-", "0.61x", "<= 120 MiB", "NO"]
    # A figure nobody measured is a dash, never a guess.
    assert by_label["warm 1 GiB blob, 1 stream, GB/s"][1:4] == ["-", "-", "-"]
    assert summary["streams_8_gbps"]["met"] is True
    assert summary["rss_peak_mib"]["mirror/distribution"] == pytest.approx(130 / 213)


def test_only_the_sections_run_have_rows() -> None:
    config = compare.settings(compare.parse_args(["--only", "rss", "--rss-streams", "4"]))
    _, rows, _ = compare.table(canned_figures(), config)
    assert [row[0] for row in rows] == ["peak RSS, 4 warm 1 GiB streams, MiB"]


def test_wrk_summary_is_read_and_errors_are_failures() -> None:
    result = compare.parse_wrk(WRK_OUTPUT)
    assert (result.requests, result.seconds, result.rate) == (1984, 1.0, 1979.53)
    for bad in ("  Non-2xx or 3xx responses: 3\n", "  Socket errors: connect 0, read 2\n"):
        with pytest.raises(compare.BenchError):
            compare.parse_wrk(WRK_OUTPUT + bad)


def test_nginx_config_sends_files_with_sendfile_from_one_private_process(
    tmp_path: Path,
) -> None:
    nginx = compare.Nginx(tmp_path / "nginx", tmp_path / "storage", "/usr/sbin/nginx")
    text = nginx.config()
    for directive in ("sendfile on;", "tcp_nopush on;", "master_process off;", "daemon off;"):
        assert directive in text
    assert f"root {tmp_path / 'storage'};" in text
    assert f"listen 127.0.0.1:{nginx.port};" in text
    assert ("user root;" in text) == (os.geteuid() == 0)
    # Nothing it writes may land outside its work dir.
    for line in text.splitlines():
        if "_path " in line or line.startswith(("pid ", "error_log ")):
            assert str(tmp_path / "nginx") in line


@pytest.mark.slow  # a server on a port
def test_blob_reader_counts_every_byte_and_refuses_short_or_long_bodies() -> None:
    body = os.urandom(100_000)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    answers = [
        head + body,
        head + body,
        head + body[:-1],
        head + body + b"x",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    ]
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for answer in answers:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert compare.read_blob("127.0.0.1", port, "/b") == (len(body), None)
        assert compare.read_blob("127.0.0.1", port, "/b", hashed=True) == (len(body), digest)
        for _ in range(3):
            with pytest.raises(compare.BenchError):
                compare.read_blob("127.0.0.1", port, "/b")
    finally:
        thread.join(timeout=10)
        listener.close()
    assert not thread.is_alive()


@pytest.mark.slow  # every server, for real, at a tiny size
def test_a_tiny_real_run_prints_every_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = compare.parse_args(
        [
            *("--blob-mb", "8", "--layer-mb", "1", "--seconds", "1"),
            *("--streams", "2", "--rss-streams", "3"),
            *("--tmpdir", str(tmp_path), "--json", str(tmp_path / "f.json")),
        ]
    )
    missing = compare.missing_tools(args.only)
    if missing:
        pytest.skip(f"missing: {missing}")
    assert compare.execute(args) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "f.json").read_text())
    assert len(written["rows"]) == len(compare.ROWS)
    for row in compare.ROWS:
        key = row.key.format(**written["settings"])
        label = written["rows"][key]["label"]
        assert label in out
        # Every row has a mirror figure (CPU over a tiny run may round to 0 ticks).
        assert written["rows"][key]["mirror"] >= 0
    for server in compare.SERVERS:
        assert written["figures"][server]["streams_2_gbps"] > 0
    assert written["figures"]["distribution"]["manifest_tag_rps"] > 0
    # The work dir (everything the run wrote) is gone; only the JSON stays.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
