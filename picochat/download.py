"""Remote text shards: download the public pretraining sets (or any numbered parquet shards) into a folder.

The standard sets are Hugging Face dataset repos of parquet shards named shard_{index:05d}.parquet:

    climbmix     karpathy/climbmix-400b-shuffle    shards 0..6542, the last one (6542) is the validation split
    fineweb-edu  karpathy/fineweb-edu-100b-shuffle shards 0..1822 (nanochat's legacy set)

A shard's URL is {endpoint}/datasets/{repo}/resolve/main/{filename}, with the endpoint from $HF_ENDPOINT
(default https://huggingface.co), so a mirror or a local test server can stand in. Any other source of
numbered shards works with a URL template such as 'https://host/path/shard_{index:05d}.parquet'.

How a file is fetched (plain HTTPS with urllib; no extra dependency, and the same code talks to a mirror):
- it is written to NAME.part and renamed to NAME only once complete and verified (os.replace is atomic), so a
  file under its final name is always whole; a file already there under its final name is skipped (and
  checked against the manifest when one is given);
- the size is checked against Content-Length, and the sha256 against a manifest (`sha256  filename` lines,
  the format of sha256sum) when one is given;
- dropped connections, timeouts and 5xx / 429 answers are retried with exponential backoff
  (base_delay * 2**attempt); a retry continues the .part file with an HTTP Range request when the server
  supports it. 4xx answers (404, 401, ...) are not retried;
- $HF_TOKEN, when set, is sent as `Authorization: Bearer ...` to the Hugging Face endpoint's host only (never
  to another host of a URL template, and dropped when a redirect leaves that host, e.g. to a CDN).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from picochat import __version__
from picochat.common import PicochatError, log, progress, warn

DEFAULT_ENDPOINT = "https://huggingface.co"
READ_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class RemoteDataset:
    name: str
    repo: str  # Hugging Face dataset repo
    num_shards: int  # shard indices are 0 .. num_shards - 1
    val_shard: int | None  # the validation shard, always downloaded; None if the set has none
    filename_template: str = "shard_{index:05d}.parquet"


# The two standard sets (REFERENCE.md A.5). A plain table, looked up by name.
DATASETS = {
    "climbmix": RemoteDataset("climbmix", "karpathy/climbmix-400b-shuffle", num_shards=6543, val_shard=6542),
    "fineweb-edu": RemoteDataset("fineweb-edu", "karpathy/fineweb-edu-100b-shuffle", num_shards=1823, val_shard=None),
}


@dataclass(frozen=True)
class Download:
    url: str
    filename: str  # name of the file in the destination folder


@dataclass
class DownloadResult:
    filename: str
    path: Path
    status: str  # "downloaded" or "skipped" (already complete)
    size_bytes: int


# ----------------------------------------------------------------------------------------------------------
# Planning: which files, from which URLs.


def parse_shard_spec(spec: str, num_shards: int | None = None) -> list[int]:
    """'0-9,12' -> [0, 1, ..., 9, 12] (sorted, without duplicates). Ranges are inclusive."""
    indices: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise PicochatError(f"--shards {spec!r}: expected indices and ranges like '0-9,12', got {part!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise PicochatError(f"--shards {spec!r}: range {part!r} goes backwards")
        if num_shards is not None and last >= num_shards:
            raise PicochatError(f"--shards {spec!r}: no shard {last} (indices are 0..{num_shards - 1})")
        indices.update(range(first, last + 1))
    return sorted(indices)


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hf_dataset_url(repo: str, filename: str, endpoint: str | None = None) -> str:
    return f"{endpoint or hf_endpoint()}/datasets/{repo}/resolve/main/{urllib.parse.quote(filename)}"


def filename_from_url(url: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlparse(url).path.rsplit("/", 1)[-1])
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise PicochatError(f"{url}: cannot take a file name from this URL (expected one ending in /NAME)")
    return name


def plan_downloads(
    dataset: str | None = "climbmix",
    *,
    num_shards: int | None = None,
    shards: str | None = None,
    url_template: str | None = None,
) -> list[Download]:
    """The files to fetch: the first `num_shards` train shards or the `shards` spec, plus the validation shard
    of a standard set. With `url_template` the shards come from there (dataset only names the folder)."""
    if (num_shards is None) == (shards is None):
        raise PicochatError("say which shards: --num-shards N (the first N) or --shards SPEC (e.g. '0-9,12')")
    remote = None
    if url_template is None:
        remote = DATASETS.get(dataset or "")
        if remote is None:
            raise PicochatError(
                f"--dataset {dataset!r}: unknown; expected one of {', '.join(DATASETS)} (or give --url-template)"
            )
    limit = None
    if remote is not None:
        # Train shards are every index except the validation shard (the last one).
        limit = remote.num_shards - (1 if remote.val_shard is not None else 0)
    if num_shards is not None:
        if num_shards < 1:
            raise PicochatError(f"--num-shards: expected a positive number, got {num_shards}")
        if limit is not None and num_shards > limit:
            raise PicochatError(f"--num-shards {num_shards}: {remote.name} has {limit} train shards")
        indices = list(range(num_shards))
    else:
        indices = parse_shard_spec(shards, remote.num_shards if remote else None)
    if remote is not None and remote.val_shard is not None and remote.val_shard not in indices:
        indices.append(remote.val_shard)

    downloads = []
    for index in indices:
        if remote is not None:
            filename = remote.filename_template.format(index=index)
            # The validation shard is saved as val_<name> so that split_train_val holds it out wherever it
            # sits (its rule: files named val* are validation).
            local_name = f"val_{filename}" if index == remote.val_shard else filename
            downloads.append(Download(hf_dataset_url(remote.repo, filename), local_name))
        else:
            try:
                url = url_template.format(index=index)
            except (KeyError, IndexError, ValueError) as error:
                raise PicochatError(
                    f"--url-template {url_template!r}: expected a Python format string with only {{index}} "
                    f"(e.g. shard_{{index:05d}}.parquet): {error!r}"
                ) from None
            downloads.append(Download(url, filename_from_url(url)))
    names = [d.filename for d in downloads]
    if len(set(names)) != len(names):
        raise PicochatError(f"--url-template {url_template!r}: different shards map to the same file name")
    return downloads


def read_sha256_manifest(path: str | os.PathLike) -> dict[str, str]:
    """filename -> sha256 from lines `HEX  filename` (sha256sum's format; `*filename` also accepted)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PicochatError(f"{path}: cannot read the sha256 manifest ({error})") from None
    manifest = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"\s*([0-9a-fA-F]{64})\s+\*?(.+?)\s*", line)
        if not match:
            expected = "'<64 hex digits>  <filename>'"
            raise PicochatError(f"{path}:{number}: expected {expected}, got {line.strip()!r}")
        manifest[Path(match.group(2)).name] = match.group(1).lower()
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Fetching one file.


class _RetryableError(Exception):
    """A transient failure (dropped connection, timeout, 5xx): worth another attempt."""


class _KeepAuthOnSameHost(urllib.request.HTTPRedirectHandler):
    # urllib copies every header to the redirected request; a token must not follow a redirect elsewhere.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        same_host = urllib.parse.urlsplit(newurl).netloc == urllib.parse.urlsplit(req.full_url).netloc
        if new is not None and not same_host:
            new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_KeepAuthOnSameHost())


def _request_headers(url: str) -> dict[str, str]:
    headers = {"User-Agent": f"picochat/{__version__}"}
    token = os.environ.get("HF_TOKEN")
    if token and urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(hf_endpoint()).netloc:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(READ_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _fetch_once(
    url: str,
    part: Path,
    timeout: float,
    on_bytes: Callable[[int], None],
    on_total: Callable[[int], None],
    cancel: threading.Event,
) -> None:
    """One attempt: fetch `url` into `part`, continuing an existing .part with a Range request. Raises
    _RetryableError on transient failures, PicochatError on final ones."""
    have = part.stat().st_size if part.exists() else 0
    headers = _request_headers(url)
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = _opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and have:  # Range not satisfiable: the .part is stale; start over
            part.unlink(missing_ok=True)
            raise _RetryableError(f"HTTP 416 for a resumed download of {part.name}") from None
        if error.code in (408, 429) or error.code >= 500:
            raise _RetryableError(f"HTTP {error.code} {error.reason}") from None
        raise PicochatError(f"{url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        raise _RetryableError(f"cannot connect: {reason}") from None

    with response:
        total = None
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
            if not match or int(match.group(1)) != have:
                part.unlink(missing_ok=True)  # an answer we cannot splice in: start over next attempt
                raise _RetryableError(f"unexpected Content-Range {content_range!r}")
            total = int(match.group(3)) if match.group(3) != "*" else None
            mode = "ab"
        else:  # 200: the server sent the whole file (also when it ignored our Range)
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            have, mode = 0, "wb"
        if total is not None:
            on_total(total - have)
        try:
            file = open(part, mode)
        except OSError as error:
            raise PicochatError(f"{part}: cannot write ({error.strerror or error})") from None
        with file:
            while True:
                try:
                    block = response.read(READ_CHUNK_BYTES)
                except (http.client.HTTPException, OSError) as error:
                    raise _RetryableError(f"connection dropped after {have} bytes ({error!r})") from None
                if not block:
                    break
                if cancel.is_set():  # Ctrl-C in the main thread: stop at the next block, keep the .part
                    raise PicochatError(f"{url}: download interrupted")
                try:
                    file.write(block)
                except OSError as error:
                    raise PicochatError(f"{part}: cannot write ({error.strerror or error})") from None
                have += len(block)
                on_bytes(len(block))
    if total is not None and have != total:
        raise _RetryableError(f"got {have} of {total} bytes")


def download_file(
    url: str,
    path: str | os.PathLike,
    *,
    expected_sha256: str | None = None,
    retries: int = 5,
    retry_base_delay: float = 1.0,
    timeout: float = 60.0,
    on_bytes: Callable[[int], None] = lambda n: None,
    on_total: Callable[[int], None] = lambda n: None,
    cancel: threading.Event | None = None,
) -> DownloadResult:
    """Fetch `url` to `path` atomically (via PATH.part), retrying transient failures `retries` times."""
    path = Path(path)
    cancel = cancel or threading.Event()
    if path.exists():
        if expected_sha256 is None:
            return DownloadResult(path.name, path, "skipped", path.stat().st_size)
        if sha256_of_file(path) == expected_sha256:
            return DownloadResult(path.name, path, "skipped", path.stat().st_size)
        warn(f"{path}: sha256 does not match the manifest; downloading it again")
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    total_reported = False

    def report_total_once(count: int) -> None:
        # A retry continues the .part, so only the first answer says how many bytes are still to come.
        nonlocal total_reported
        if not total_reported:
            total_reported = True
            on_total(count)

    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout, on_bytes, report_total_once, cancel)
            break
        except _RetryableError as error:
            if attempt == retries:
                raise PicochatError(
                    f"{url}: download failed after {retries + 1} attempts ({error}); "
                    f"the partial data is kept in {part} and a rerun continues it"
                ) from None
            delay = retry_base_delay * 2**attempt
            warn(f"{url}: {error}; retrying in {delay:g}s (attempt {attempt + 2} of {retries + 1})")
            if cancel.wait(delay):
                raise PicochatError(f"{url}: download interrupted") from None
    if expected_sha256 is not None:
        actual = sha256_of_file(part)
        if actual != expected_sha256:
            part.unlink(missing_ok=True)
            raise PicochatError(
                f"{url}: sha256 mismatch for {path.name}: expected {expected_sha256}, got {actual} "
                "(the downloaded data was deleted)"
            )
    os.replace(part, path)
    return DownloadResult(path.name, path, "downloaded", path.stat().st_size)


# ----------------------------------------------------------------------------------------------------------
# Fetching many files in parallel.


def download_files(
    downloads: list[Download],
    dest: str | os.PathLike,
    *,
    workers: int = 4,
    retries: int = 5,
    retry_base_delay: float = 1.0,
    timeout: float = 60.0,
    sha256_manifest: dict[str, str] | None = None,
) -> list[DownloadResult]:
    """Fetch every download into `dest` with `workers` threads (I/O bound, so threads suffice), one progress
    bar over bytes. Every file is attempted; if some fail, one PicochatError says so (the others are kept)."""
    dest = Path(dest)
    if workers < 1:
        raise PicochatError(f"--workers: expected a positive number, got {workers}")
    if retries < 0:
        raise PicochatError(f"--retries: expected 0 or more, got {retries}")
    if sha256_manifest is not None:
        missing = [d.filename for d in downloads if d.filename not in sha256_manifest]
        if missing:
            count = len(missing)
            raise PicochatError(f"the sha256 manifest has no line for {missing[0]} ({count} files missing)")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or error
        raise PicochatError(f"{dest}: cannot create the destination folder ({reason})") from None

    bar = progress(total=0, desc="download", unit="B", unit_scale=True)
    lock = threading.Lock()
    cancel = threading.Event()

    def on_bytes(count: int) -> None:
        with lock:
            bar.update(count)

    def on_total(count: int) -> None:
        with lock:
            bar.total += count
            bar.refresh()

    def fetch(download: Download) -> DownloadResult:
        expected = sha256_manifest.get(download.filename) if sha256_manifest else None
        result = download_file(
            download.url,
            dest / download.filename,
            expected_sha256=expected,
            retries=retries,
            retry_base_delay=retry_base_delay,
            timeout=timeout,
            on_bytes=on_bytes,
            on_total=on_total,
            cancel=cancel,
        )
        if result.status == "downloaded":
            log(f"downloaded {result.filename} ({result.size_bytes:,} bytes)")
        return result

    results: list[DownloadResult] = []
    failures: list[str] = []
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(fetch, download) for download in downloads]
        for future in futures:
            try:
                results.append(future.result())
            except PicochatError as error:
                failures.append(str(error))
    except KeyboardInterrupt:
        cancel.set()  # running downloads stop at their next block; their .part files stay for a rerun
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if failures:
        if len(failures) == 1:
            raise PicochatError(failures[0])
        raise PicochatError(f"{len(failures)} of {len(downloads)} downloads failed; first: {failures[0]}")
    skipped = sum(r.status == "skipped" for r in results)
    log(f"{len(results) - skipped} files downloaded, {skipped} already complete, in {dest}")
    return results
