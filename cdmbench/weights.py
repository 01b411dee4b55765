"""Pretrained weights resolved the way their libraries do: local cache first, then a download
through the library's own mechanism when the machine is online.

- Hugging Face files go through ``huggingface_hub`` (its cache, ``HF_HOME`` /
  ``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_TOKEN``); a file already in the cache is used without
  any network call, so a cached ``main`` is not refreshed behind a benchmark's back.
- Plain URLs (clean-fid's Inception) are downloaded once to the path the library itself uses,
  through a temporary file renamed into place (a checksum, when known, is verified first).
- ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) turns every download off. Before a
  download the host (or the proxy for it) must accept a TCP connection within
  :data:`CONNECT_TIMEOUT` seconds, so an unreachable host fails in seconds rather than after
  the libraries' retries. Either way a :class:`MissingWeightsError` names what to fetch; the CLI
  prints it as one line and exits 2.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import urllib.request
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cdmbench.errors import MissingWeightsError

T = TypeVar("T")
CONNECT_TIMEOUT = 3.0  # seconds a host (or its proxy) has to accept a connection
PROGRESS_BYTES = 16 << 20  # downloads at least this large show a progress bar (on a terminal)


# ------------------------------------------------------------------------------ reachability
def hub_offline() -> bool:
    """Whether downloads are turned off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The Hugging Face endpoint downloads go to (``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def _connect_target(url: str) -> tuple[str, int]:
    """(host, port) a request for ``url`` connects to: the proxy for it, if any."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return host, parts.port or (443 if parts.scheme == "https" else 80)


@lru_cache(maxsize=32)
def _probe(host: str, port: int, timeout: float) -> str | None:
    """None when ``host:port`` accepts a TCP connection within ``timeout`` s, else why not.

    Name resolution and connection run in a daemon thread, so a resolver that hangs costs
    ``timeout`` too. Cached per process: one probe per host."""
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port} unreachable: {e.strerror or type(e).__name__}")

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"{host}:{port} did not answer within {timeout:g} s"


def unavailable(url: str) -> str | None:
    """Why nothing can be downloaded from ``url`` now (offline mode, host unreachable), or None."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    return _probe(*_connect_target(url), CONNECT_TIMEOUT)


def download(what: str, source: str, url: str, hint: str, fn: Callable[[], T]) -> T:
    """``fn()`` (a library's own download call) when ``url``'s host is reachable; any failure
    becomes one :class:`MissingWeightsError`: ``<what>: <source> is not on this machine and
    could not be downloaded (<why>); <hint>``."""
    why = unavailable(url)
    if why is None:
        try:
            return fn()
        except MissingWeightsError:
            raise
        except Exception as e:  # gated, missing, dropped connection: one line either way
            first = (str(e).strip().splitlines() or [""])[0][:160]
            why = f"{type(e).__name__}: {first}" if first else type(e).__name__
    raise MissingWeightsError(
        f"{what}: {source} is not on this machine and could not be downloaded ({why}); {hint}"
    )


# ------------------------------------------------------------------------------ hub files
def cached_hub_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    repo_type: str | None = None,
) -> Path | None:
    """``repo_id/filename`` from the Hugging Face cache, looked up without any network call."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(
        repo_id, filename, cache_dir=cache_dir, revision=revision, repo_type=repo_type
    )
    return Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None


def hub_file(
    repo_id: str,
    filename: str,
    *,
    what: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    repo_type: str | None = None,
    hint: str | None = None,
) -> Path:
    """``repo_id/filename`` from the Hugging Face cache, downloaded with ``hf_hub_download``
    when missing and the hub is reachable. ``what`` names the metric or model in the error,
    ``hint`` (default: an ``hf download`` command) says how to fetch it by hand."""
    hit = cached_hub_file(
        repo_id, filename, revision=revision, cache_dir=cache_dir, repo_type=repo_type
    )
    if hit is not None:
        return hit
    from huggingface_hub import hf_hub_download

    return Path(
        download(
            what,
            f"{repo_id}/{filename}",
            hub_endpoint(),
            hint
            or f"run `hf download {repo_id} {filename}` on a machine with internet "
            "(or copy the Hugging Face cache here)",
            lambda: hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, repo_type=repo_type
            ),
        )
    )


# ------------------------------------------------------------------------------ plain URLs
def url_file(
    url: str,
    dest: str | os.PathLike,
    *,
    what: str,
    sha256: str | None = None,
    hint: str | None = None,
) -> Path:
    """The file at ``dest``, downloaded from ``url`` first if it is not there.

    The download goes to a temporary file next to ``dest`` and is renamed into place once
    complete (and, given ``sha256``, verified), under a file lock, so concurrent processes
    download it once and never see a partial file. A progress bar shows on a terminal for
    files of :data:`PROGRESS_BYTES` or more.
    """
    dest = Path(dest).expanduser()
    if dest.is_file():
        return dest
    hint = hint or f"fetch {url} and save it as {dest}"
    return download(what, str(dest), url, hint, lambda: _fetch_url(url, dest, sha256))


def _fetch_url(url: str, dest: Path, sha256: str | None) -> Path:
    from huggingface_hub import constants

    from cdmbench.io import atomic_path, remove_stale_temps
    from cdmbench.locks import file_lock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(str(dest) + ".lock", "download"):
        if dest.is_file():  # another process finished it while we waited
            return dest
        remove_stale_temps(dest.parent, recursive=False, prefix=dest.name)
        digest = hashlib.sha256()
        # written beside dest under the writer's name and renamed when whole: a killed
        # download's partial file is removed by the next one, a live one's is left alone
        with atomic_path(dest) as tmp:
            req = urllib.request.Request(url, headers={"User-Agent": "cdmbench"})
            with (
                urllib.request.urlopen(req, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as src,
                open(tmp, "wb") as out,
                _progress(src.headers.get("Content-Length"), dest.name) as bar,
            ):
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if sha256 is not None and digest.hexdigest() != sha256.lower():
                raise ValueError(
                    f"checksum mismatch for {url}: sha256 {digest.hexdigest()}, expected {sha256}"
                )
    return dest


def _progress(length: str | None, name: str) -> Any:
    from tqdm.auto import tqdm

    total = int(length) if length and length.isdigit() else None
    quiet = total is not None and total < PROGRESS_BYTES
    return tqdm(
        total=total,
        desc=f"downloading {name}",
        unit="B",
        unit_scale=True,
        disable=True if quiet else None,  # None: only on a terminal
        leave=False,
    )


__all__ = [
    "CONNECT_TIMEOUT",
    "cached_hub_file",
    "download",
    "hub_endpoint",
    "hub_file",
    "hub_offline",
    "unavailable",
    "url_file",
]
