"""A Hugging Face hub on 127.0.0.1 for download tests: just the endpoints ``huggingface_hub``
(``hf_hub_download``, ``snapshot_download``), open_clip and diffusers use, serving files the
test makes, and plain URLs (clean-fid's Inception). It counts what it serves.

- ``HEAD|GET /{repo}/resolve/{revision}/{path}``: ``X-Repo-Commit``, ``ETag`` (the sha256, as
  the hub sends for LFS files), ``Content-Length``; 404 with ``X-Error-Code: EntryNotFound``
  for a file the repo lacks, ``RepoNotFound`` for an unknown repo.
- ``GET /api/models/{repo}[/revision/{revision}]``: ``{"id", "sha", "siblings"}``.
- ``GET /api/models/{repo}/tree/{revision}``: every file (``type``, ``path``, ``size``, ``oid``).
- ``HEAD|GET {path}`` of :attr:`FakeHub.urls`: a plain file.

Use: ``with FakeHub() as hub: hub.add_repo("org/name", {"file": b"..."}); hub.url``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.urls: dict[str, bytes] = {}
        self.requests: Counter[tuple[str, str]] = Counter()  # (method, path) -> count
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- content
    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Serve ``files`` (path in repo -> bytes) as ``repo_id`` at ``main``; its commit."""
        self.repos[repo_id] = dict(files)
        return self.commit(repo_id)

    def commit(self, repo_id: str) -> str:
        h = hashlib.sha1()
        for path, data in sorted(self.repos[repo_id].items()):
            h.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def downloads(self, path_end: str) -> int:
        """How many GETs (bodies sent) of a path ending in ``path_end``."""
        with self._lock:
            return sum(
                n for (m, p), n in self.requests.items() if m == "GET" and p.endswith(path_end)
            )

    # ---- server
    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    # ---- requests
    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.requests[(h.command, path)] += 1
        if path in self.urls:
            return self._send(h, 200, self.urls[path], body, {})
        if path.startswith("/api/models/"):
            return self._api(h, path[len("/api/models/") :], body)
        if "/resolve/" in path:
            repo, rest = path[1:].split("/resolve/", 1)
            revision, _, file = rest.partition("/")
            return self._resolve(h, repo, revision, file, body)
        self._send(h, 404, b"not found", body, {})

    def _known(self, repo: str, revision: str) -> bool:
        return repo in self.repos and revision in ("main", self.commit(repo))

    def _resolve(self, h, repo: str, revision: str, file: str, body: bool) -> None:
        if not self._known(repo, revision):
            return self._send(h, 404, b"", body, {"X-Error-Code": "RepoNotFound"})
        commit = self.commit(repo)
        data = self.repos[repo].get(file)
        if data is None:
            head = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
            return self._send(h, 404, b"", body, head)
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        self._send(h, 200, data, body, {"X-Repo-Commit": commit, "ETag": etag})

    def _api(self, h, rest: str, body: bool) -> None:
        for repo in self.repos:
            if rest == repo or rest.startswith(repo + "/"):
                break
        else:
            return self._send(h, 404, b"{}", body, {"X-Error-Code": "RepoNotFound"})
        tail = rest[len(repo) :].strip("/")
        kind, _, revision = tail.partition("/")
        revision = revision or "main"
        if not self._known(repo, revision):
            return self._send(h, 404, b"{}", body, {"X-Error-Code": "RevisionNotFound"})
        files = self.repos[repo]
        if kind in ("", "revision"):
            info = {
                "id": repo,
                "sha": self.commit(repo),
                "siblings": [{"rfilename": p} for p in sorted(files)],
            }
        elif kind == "tree":
            info = [
                {
                    "type": "file",
                    "path": p,
                    "size": len(d),
                    "oid": hashlib.sha1(b"blob %d\0" % len(d) + d).hexdigest(),
                }
                for p, d in sorted(files.items())
            ]
        else:
            return self._send(h, 404, b"{}", body, {})
        head = {"Content-Type": "application/json"}
        self._send(h, 200, json.dumps(info).encode(), body, head)

    @staticmethod
    def _send(h, code: int, data: bytes, body: bool, headers: dict[str, str]) -> None:
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)
