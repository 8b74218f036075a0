"""A local stand-in for the Hugging Face Hub's download routes, for tests (point ``HF_ENDPOINT`` at ``url``).

It answers what ``huggingface_hub``'s ``model_info`` / ``snapshot_download`` / ``hf_hub_download`` ask, so that the
cache is laid out by huggingface_hub itself:

- ``GET /api/models/{repo}[/revision/{rev}]``: id, ``sha`` of the revision, ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}``: the file list (huggingface_hub >= 2 lists files this way);
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag``, ``Content-Length``, the bytes (``Range``);
- errors with the Hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and status
  codes: a private repo answers 401 without its token, a gated one 401 without a token and 403 with another one.

Every request is logged (``requests``) so that tests can count downloads.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

Source = Path | bytes


def _read(src: Source) -> bytes:
    return src if isinstance(src, bytes) else src.read_bytes()


@dataclass
class Repo:
    commits: dict[str, dict[str, Source]] = field(default_factory=dict)  # commit sha -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch / tag -> commit sha
    access: str = "public"  # public | private | gated

    def commit_of(self, revision: str) -> str | None:
        revision = unquote(revision)
        return revision if revision in self.commits else self.refs.get(revision)


class FakeHub:
    def __init__(self, token: str = "hf_valid_token") -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._etags: dict[tuple[str, str, str], str] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, files: dict[str, Source], refs: tuple[str, ...] = ("main",),
            access: str = "public") -> str:
        """Adds a commit holding ``files`` to ``repo_id``; ``refs`` then point at it. Returns the commit sha."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(_read(files[name])).digest())
        commit = digest.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo(access=access))
        repo.commits[commit] = dict(files)
        repo.refs.update(dict.fromkeys(refs, commit))
        return commit

    def downloads(self, repo_id: str) -> list[str]:
        """Paths of the files whose bytes were sent (GET on resolve), in order."""
        prefix = f"/{repo_id}/resolve/"
        return [p.split("/", 5)[-1] for m, p in self.requests if m == "GET" and p.startswith(prefix)]

    # ------------------------------------------------------------------------------------------ HTTP
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                hub._serve(self, body=True)

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

        return Handler

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = urlparse(h.path).path
        self.requests.append((h.command, path))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+|[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            return self._model_info(h, m.group(1), m.group(2) or "main")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if m:
            return self._tree(h, m.group(1), m.group(2))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._file(h, m.group(1), m.group(2), unquote(m.group(3)), body)
        self._error(h, 404, "", "not a Hub route")

    def _check(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str) -> tuple[Repo, str] | None:
        repo = self.repos.get(repo_id)
        auth = h.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        if repo is None or (repo.access == "private" and token != self.token):
            self._error(h, 401 if token is None else 404, "RepoNotFound", "Repository not found")
            return None
        if repo.access == "gated" and token != self.token:
            self._error(h, 401 if token is None else 403, "GatedRepo", "Access to this model is restricted")
            return None
        commit = repo.commit_of(revision)
        if commit is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, commit

    def _model_info(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str) -> None:
        found = self._check(h, repo_id, revision)
        if found:
            repo, commit = found
            self._json(h, {"_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": commit,
                           "private": repo.access == "private", "gated": "auto" if repo.access == "gated" else False,
                           "siblings": [{"rfilename": f} for f in sorted(repo.commits[commit])], "tags": []})

    def _tree(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str) -> None:
        found = self._check(h, repo_id, revision)
        if found:
            repo, commit = found
            files = repo.commits[commit]
            self._json(h, [{"type": "file", "path": f, "size": len(_read(files[f])),
                            "oid": hashlib.sha1(_read(files[f])).hexdigest()} for f in sorted(files)])

    def _file(self, h: BaseHTTPRequestHandler, repo_id: str, revision: str, name: str, body: bool) -> None:
        found = self._check(h, repo_id, revision)
        if not found:
            return
        repo, commit = found
        if name not in repo.commits[commit]:
            return self._error(h, 404, "EntryNotFound", f"{name} does not exist at {revision}")
        data = _read(repo.commits[commit][name])
        start = 0
        rng = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if rng and body:
            start = int(rng.group(1))
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(data) - start))
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        if body:
            view = memoryview(data)[start:]
            for i in range(0, len(view), 1 << 20):
                h.wfile.write(view[i:i + (1 << 20)])

    def _json(self, h: BaseHTTPRequestHandler, obj: object) -> None:
        data = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
