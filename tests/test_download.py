"""Remote shards, against a local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.cli import main
from picochat.common import PicochatError
from picochat.data import find_text_files, iter_documents, split_train_val
from picochat.download import (
    Download,
    download_file,
    download_files,
    parse_shard_spec,
    plan_downloads,
    read_sha256_manifest,
)

CLIMBMIX = "/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
FAST = ["--retry-delay", "0.01", "--timeout", "10"]


def shard_bytes(index: int) -> bytes:
    """A small but real parquet shard (a few KB, so a dropped connection cuts it in the middle)."""
    sink = pa.BufferOutputStream()
    texts = [f"shard {index} document {j} " + "lorem ipsum " * 40 for j in range(12)]
    pq.write_table(pa.table({"text": texts}), sink, row_group_size=4, compression="none")
    return sink.getvalue().to_pybytes()


class ShardServer:
    """What the test HTTP server serves, and what it saw."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}  # URL path -> body
        self.drops: dict[str, int] = {}  # URL path -> answers to cut mid-body (-1: every answer)
        self.statuses: dict[str, list[int]] = {}  # URL path -> error statuses to answer first
        self.redirects: dict[str, str] = {}  # URL path -> Location
        self.support_range = True
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.url = ""

    def requests_for(self, path: str) -> list[dict[str, str]]:
        return [headers for p, headers in self.requests if p == path]


def make_handler(state: ShardServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):
            with state.lock:
                state.requests.append((self.path, dict(self.headers.items())))
                statuses = state.statuses.get(self.path)
                status = statuses.pop(0) if statuses else None
                drop = state.drops.get(self.path, 0) if status is None else 0
                if drop > 0:
                    state.drops[self.path] = drop - 1
            if self.path in state.redirects:
                self.send_response(302)
                self.send_header("Location", state.redirects[self.path])
                self.end_headers()
                return
            body = state.files.get(self.path)
            if status is not None or body is None:
                self.send_error(status or 404)
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if state.support_range and match:
                start = int(match.group(1))
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if drop != 0:  # send half of the body, then cut the connection
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server(monkeypatch):
    for name in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "HF_TOKEN",
        "HF_ENDPOINT",
    ]:
        monkeypatch.delenv(name, raising=False)
    state = ShardServer()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def serve_climbmix(server: ShardServer, indices) -> None:
    for index in indices:
        server.files[f"{CLIMBMIX}/shard_{index:05d}.parquet"] = shard_bytes(index)


def assert_one_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert err.count("picochat: error:") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ----------------------------------------------------------------------------------------------------------
# Planning.


def test_parse_shard_spec():
    assert parse_shard_spec("0-3,12, 2,7-7") == [0, 1, 2, 3, 7, 12]
    assert parse_shard_spec("5") == [5]
    for bad, message in [
        ("", "expected indices"),
        ("1-", "expected indices"),
        ("a", "expected indices"),
        ("5-2", "backwards"),
        ("-1", "expected indices"),
    ]:
        with pytest.raises(PicochatError, match=message):
            parse_shard_spec(bad)
    with pytest.raises(PicochatError, match="no shard 10"):
        parse_shard_spec("8-10", num_shards=10)


def test_plan_standard_sets(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    plan = plan_downloads("climbmix", num_shards=2)
    assert [d.filename for d in plan] == ["shard_00000.parquet", "shard_00001.parquet", "val_shard_06542.parquet"]
    assert plan[0].url == (
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_00000.parquet"
    )
    assert [d.filename for d in plan_downloads("climbmix", shards="6540-6542")] == [
        "shard_06540.parquet",
        "shard_06541.parquet",
        "val_shard_06542.parquet",
    ]
    fineweb = plan_downloads("fineweb-edu", shards="0,1822")
    assert [d.filename for d in fineweb] == ["shard_00000.parquet", "shard_01822.parquet"]  # no val shard
    assert "karpathy/fineweb-edu-100b-shuffle" in fineweb[0].url
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example/")
    assert plan_downloads("climbmix", num_shards=1)[0].url.startswith("http://mirror.example/datasets/")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "climbmix"}, "say which shards"),
        ({"dataset": "climbmix", "num_shards": 1, "shards": "0"}, "say which shards"),
        ({"dataset": "nope", "num_shards": 1}, "unknown"),
        ({"dataset": "climbmix", "num_shards": 6543}, "6542 train shards"),
        ({"dataset": "fineweb-edu", "num_shards": 0}, "positive"),
        ({"dataset": "fineweb-edu", "shards": "1823"}, "no shard 1823"),
        ({"dataset": "x", "num_shards": 2, "url_template": "http://h/{idx}.parquet"}, "only {index}"),
        ({"dataset": "x", "num_shards": 2, "url_template": "http://h/same.parquet"}, "same file name"),
        ({"dataset": "x", "num_shards": 1, "url_template": "http://h/{index}/"}, "cannot take a file name"),
    ],
)
def test_plan_errors(kwargs, message):
    with pytest.raises(PicochatError, match=re.escape(message)):
        plan_downloads(**kwargs)


def test_sha256_manifest(tmp_path):
    digest = "ab" * 32
    path = tmp_path / "SHA256SUMS"
    path.write_text(f"# comment\n\n{digest}  shard_00000.parquet\n{digest.upper()} *sub/shard_00001.parquet")
    assert read_sha256_manifest(path) == {"shard_00000.parquet": digest, "shard_00001.parquet": digest}
    path.write_text(f"{digest}  a.parquet\nnot a checksum line\n")
    with pytest.raises(PicochatError, match="SHA256SUMS:2: expected"):
        read_sha256_manifest(path)
    with pytest.raises(PicochatError, match="cannot read the sha256 manifest"):
        read_sha256_manifest(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------------
# Downloading.


def test_hf_endpoint_mode_downloads_train_shards_and_val(server, tmp_path, monkeypatch, capsys):
    serve_climbmix(server, [0, 1, 2, 6542])
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    assert main(["data", "download", "--num-shards", "2", "--data-dir", str(tmp_path), *FAST]) == 0
    capsys.readouterr()
    folder = tmp_path / "climbmix"
    assert sorted(p.name for p in folder.iterdir()) == [
        "shard_00000.parquet",
        "shard_00001.parquet",
        "val_shard_06542.parquet",
    ]
    for path in folder.iterdir():
        assert path.read_bytes() == server.files[f"{CLIMBMIX}/{path.name.removeprefix('val_')}"]
    assert all(headers.get("Authorization") == "Bearer secret-token" for _, headers in server.requests)
    # The shards are ready to use: shard 6542 (saved as val_*) is the validation split.
    train, val = split_train_val(find_text_files([folder]))
    assert [p.name for p in val] == ["val_shard_06542.parquet"]
    texts = [t for t, _ in iter_documents(train)]
    assert len(texts) == 24 and texts[0].startswith("shard 0 document 0")


def test_url_template_mode_in_parallel(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "secret-token")  # must not be sent to a host other than the HF endpoint
    for index in [0, 1, 2, 5]:
        server.files[f"/files/part-{index:03d}.parquet"] = shard_bytes(index)
    template = server.url + "/files/part-{index:03d}.parquet"
    argv = ["data", "download", "--url-template", template, "--shards", "0-2,5", "--workers", "3"]
    assert main([*argv, "--data-dir", str(tmp_path), *FAST]) == 0
    capsys.readouterr()
    folder = tmp_path / "custom"
    assert sorted(p.name for p in folder.iterdir()) == [f"part-{i:03d}.parquet" for i in [0, 1, 2, 5]]
    assert all("Authorization" not in headers for _, headers in server.requests)
    dest = tmp_path / "elsewhere"
    assert main(["data", "download", "--url-template", template, "--shards", "0", "--dest", str(dest)]) == 0
    assert [p.name for p in dest.iterdir()] == ["part-000.parquet"]
    capsys.readouterr()


def test_dropped_connections_are_retried_and_resumed_with_range(server, tmp_path):
    body = shard_bytes(3)
    server.files["/s.parquet"] = body
    server.drops["/s.parquet"] = 2
    result = download_file(server.url + "/s.parquet", tmp_path / "s.parquet", retries=3, retry_base_delay=0)
    assert result.status == "downloaded"
    assert (tmp_path / "s.parquet").read_bytes() == body
    assert not (tmp_path / "s.parquet.part").exists()
    headers = server.requests_for("/s.parquet")
    assert len(headers) == 3
    assert "Range" not in headers[0]
    assert headers[1]["Range"] == f"bytes={len(body) // 2}-"  # continued where the first answer stopped
    assert headers[2]["Range"].startswith("bytes=")


def test_retries_without_range_support_start_over(server, tmp_path):
    server.support_range = False
    server.files["/s.parquet"] = body = shard_bytes(4)
    server.drops["/s.parquet"] = 1
    server.statuses["/s.parquet"] = [503]
    download_file(server.url + "/s.parquet", tmp_path / "s.parquet", retries=3, retry_base_delay=0.01)
    assert (tmp_path / "s.parquet").read_bytes() == body
    assert len(server.requests_for("/s.parquet")) == 3  # 503, dropped, whole


def test_a_partial_file_from_an_earlier_run_is_continued(server, tmp_path):
    server.files["/s.parquet"] = body = shard_bytes(5)
    (tmp_path / "s.parquet.part").write_bytes(body[:1000])
    download_file(server.url + "/s.parquet", tmp_path / "s.parquet", retries=0)
    assert (tmp_path / "s.parquet").read_bytes() == body
    assert server.requests_for("/s.parquet")[0]["Range"] == "bytes=1000-"


def test_always_dropping_server_is_a_clear_error_and_leaves_no_file(server, tmp_path, capsys):
    server.files["/s0.parquet"] = shard_bytes(6)
    server.drops["/s0.parquet"] = -1
    template = server.url + "/s{index}.parquet"
    argv = ["data", "download", "--url-template", template, "--num-shards", "1", "--retries", "2"]
    assert main([*argv, "--dest", str(tmp_path), *FAST]) == 2
    assert_one_error(capsys, f"{server.url}/s0.parquet", "download failed after 3 attempts")
    assert not (tmp_path / "s0.parquet").exists()
    assert len(server.requests_for("/s0.parquet")) == 3


def test_not_found_is_not_retried(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    assert main(["data", "download", "--shards", "7", "--data-dir", str(tmp_path), *FAST]) == 2
    assert_one_error(capsys, "HTTP 404", "shard_0")
    assert len(server.requests) == 2  # shard 7 and the val shard, once each
    assert not list((tmp_path / "climbmix").glob("*.parquet"))


def test_checksum_mismatch_is_an_error_and_removes_the_data(server, tmp_path, capsys):
    server.files["/a.parquet"] = shard_bytes(0)
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text(f"{'0' * 64}  a.parquet\n")
    dest = tmp_path / "out"
    argv = ["data", "download", "--url-template", server.url + "/a.parquet#{index}", "--num-shards", "1"]
    assert main([*argv, "--dest", str(dest), "--sha256-manifest", str(manifest), *FAST]) == 2
    assert_one_error(capsys, "sha256 mismatch for a.parquet", "0" * 64)
    assert list(dest.iterdir()) == []  # neither the final file nor a .part


def test_manifest_verified_download_skip_and_repair(server, tmp_path, capsys):
    bodies = {f"/d/{i}.parquet": shard_bytes(i) for i in range(3)}
    server.files.update(bodies)
    manifest = tmp_path / "SHA256SUMS"
    lines = [f"{hashlib.sha256(body).hexdigest()}  {path.split('/')[-1]}\n" for path, body in bodies.items()]
    manifest.write_text("".join(lines))
    dest = tmp_path / "out"
    argv = [
        "data",
        "download",
        "--url-template",
        server.url + "/d/{index}.parquet",
        "--shards",
        "0-2",
        "--dest",
        str(dest),
        "--sha256-manifest",
        str(manifest),
        *FAST,
    ]
    assert main(argv) == 0
    assert len(server.requests) == 3
    # A second run finds every file complete (and verified): nothing is fetched.
    assert main(argv) == 0
    assert len(server.requests) == 3
    # A file that no longer matches the manifest is fetched again.
    (dest / "1.parquet").write_bytes(b"corrupted")
    assert main(argv) == 0
    assert len(server.requests) == 4 and (dest / "1.parquet").read_bytes() == bodies["/d/1.parquet"]
    # Without a manifest, complete files are skipped without a request.
    results = download_files([Download(server.url + "/d/0.parquet", "0.parquet")], dest, retry_base_delay=0)
    assert [r.status for r in results] == ["skipped"] and len(server.requests) == 4
    capsys.readouterr()


def test_manifest_without_a_line_for_a_file(server, tmp_path):
    manifest = {"other.parquet": "0" * 64}
    with pytest.raises(PicochatError, match="no line for 0.parquet"):
        download_files([Download(server.url + "/0.parquet", "0.parquet")], tmp_path, sha256_manifest=manifest)
    assert server.requests == []


def test_token_is_not_sent_after_a_redirect_to_another_host(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    port = server.url.rsplit(":", 1)[1]
    server.files["/cdn/blob"] = body = shard_bytes(9)
    server.redirects["/start/x.parquet"] = f"http://localhost:{port}/cdn/blob"  # same server, other host name
    download_file(server.url + "/start/x.parquet", tmp_path / "x.parquet", retries=0)
    assert (tmp_path / "x.parquet").read_bytes() == body
    assert server.requests_for("/start/x.parquet")[0]["Authorization"] == "Bearer secret-token"
    assert "Authorization" not in server.requests_for("/cdn/blob")[0]


def test_several_failures_make_one_error_line(server, tmp_path, capsys):
    server.files["/ok/0.parquet"] = shard_bytes(0)
    argv = [
        "data",
        "download",
        "--url-template",
        server.url + "/ok/{index}.parquet",
        "--shards",
        "0-2",
        "--dest",
        str(tmp_path),
        *FAST,
    ]
    assert main(argv) == 2
    assert_one_error(capsys, "2 of 3 downloads failed", "HTTP 404")
    assert [p.name for p in tmp_path.iterdir()] == ["0.parquet"]  # the good file is kept


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "download", "--num-shards", "1", "--dataset", "nope"], "unknown"),
        (["data", "download"], "say which shards"),
        (["data", "download", "--num-shards", "1", "--workers", "0"], "--workers"),
        (["data", "download", "--num-shards", "1", "--sha256-manifest", "/nonexistent"], "manifest"),
    ],
)
def test_cli_download_usage_errors(argv, message, capsys, server, tmp_path):
    assert main([*argv, "--data-dir", str(tmp_path)]) == 2
    assert_one_error(capsys, message)
    assert server.requests == []
    assert not Path(tmp_path / "climbmix").exists() or not any((tmp_path / "climbmix").iterdir())


def test_cancel_stops_a_download_and_keeps_no_final_file(server, tmp_path):
    server.files["/s.parquet"] = shard_bytes(1)
    server.statuses["/s.parquet"] = [503]
    cancel = threading.Event()
    cancel.set()  # as after Ctrl-C: the retry wait returns at once and the download stops
    with pytest.raises(PicochatError, match="download interrupted"):
        download_file(server.url + "/s.parquet", tmp_path / "s.parquet", retry_base_delay=60, cancel=cancel)
    assert not (tmp_path / "s.parquet").exists()
