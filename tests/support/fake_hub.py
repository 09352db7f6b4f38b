"""A small Hugging Face hub on 127.0.0.1 for tests: enough of the HTTP API that huggingface-hub's own
client code (model_info, hf_hub_download with resume) runs against it unchanged. Point HF_ENDPOINT at
`FakeHub.url`."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, Path]] = {}  # repo id -> {filename: local file}
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.fail_after: dict[str, int] = {}  # filename -> cut the body after this many bytes, once
        self.stall_after: dict[str, int] = {}  # filename -> send this many bytes, then hang until `release`, once
        self.stalled, self.release = threading.Event(), threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo: str, files: dict[str, Path]) -> None:
        self.repos[repo] = files

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    @staticmethod
    def sha256(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def _error(self, h, code: int, error_code: str, message: str):
        body = json.dumps({"error": message}).encode()
        h.send_response(code)
        h.send_header("X-Error-Code", error_code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h, data, body=True):
        raw = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        if body:
            h.wfile.write(raw)

    def _serve(self, h, body: bool):
        path = h.path.split("?")[0]
        self.requests.append((h.command, path, h.headers.get("Range", "")))
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
        if m:
            repo = m.group(1)
            if repo not in self.repos:
                return self._error(h, 404, "RepoNotFound", f"Repository {repo} not found")
            siblings = []
            for name, f in self.repos[repo].items():
                size = f.stat().st_size
                entry = {"rfilename": name, "size": size}
                if name.endswith((".gguf", ".safetensors")):
                    entry["lfs"] = {"sha256": self.sha256(f), "size": size, "pointerSize": 134}
                siblings.append(entry)
            return self._json(h, {"id": repo, "modelId": repo, "sha": self.commit(repo), "siblings": siblings,
                                  "gated": repo in self.gated, "private": False}, body)
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?$", path)
        if m:
            repo = m.group(1)
            if repo not in self.repos:
                return self._error(h, 404, "RepoNotFound", f"Repository {repo} not found")
            entries = []
            for name, f in self.repos[repo].items():
                size = f.stat().st_size
                entry = {"type": "file", "path": name, "size": size, "oid": hashlib.sha1(name.encode()).hexdigest()}
                if name.endswith((".gguf", ".safetensors")):
                    entry["lfs"] = {"oid": self.sha256(f), "size": size, "pointerSize": 134}
                entries.append(entry)
            return self._json(h, entries, body)
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            repo, _, name = m.groups()
            if repo not in self.repos:
                return self._error(h, 404, "RepoNotFound", f"Repository {repo} not found")
            if repo in self.gated and not h.headers.get("Authorization"):
                return self._error(h, 401, "GatedRepo", f"Access to {repo} is restricted")
            f = self.repos[repo].get(name)
            if f is None:
                return self._error(h, 404, "EntryNotFound", f"{name} not found in {repo}")
            data = f.read_bytes()
            etag = self.sha256(f) if name.endswith((".gguf", ".safetensors")) else hashlib.sha1(data).hexdigest()
            start = 0
            rng = h.headers.get("Range")
            if rng and (r := re.match(r"bytes=(\d+)-", rng)):
                start = int(r.group(1))
            chunk = data[start:]
            h.send_response(206 if start else 200)
            h.send_header("X-Repo-Commit", self.commit(repo))
            h.send_header("ETag", f'"{etag}"')
            if name.endswith((".gguf", ".safetensors")):
                h.send_header("X-Linked-Etag", f'"{etag}"')
                h.send_header("X-Linked-Size", str(len(data)))
            h.send_header("Content-Length", str(len(chunk)))
            if start:
                h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            h.send_header("Accept-Ranges", "bytes")
            h.end_headers()
            if body:
                stall = self.stall_after.pop(name, None)
                if stall is not None and stall < len(chunk):
                    h.wfile.write(chunk[:stall])
                    h.wfile.flush()
                    self.stalled.set()
                    self.release.wait(120)
                    h.close_connection = True
                    return
                cut = self.fail_after.pop(name, None)
                if cut is not None and cut < len(chunk):
                    h.wfile.write(chunk[:cut])
                    h.wfile.flush()
                    h.close_connection = True
                    h.connection.shutdown(2)
                    return
                h.wfile.write(chunk)
            return
        return self._error(h, 404, "NotFound", f"no route for {path}")
