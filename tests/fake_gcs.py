"""A fake Google Cloud Storage for tests, all in this process and offline.

`gs://<bucket>/<name>` objects are files under a local root folder. Two doors lead to them, the
two that a training run on cloud storage uses:

- etils.epath (m2jax's paths, orbax's metadata and commit files, grain's iterator states): an
  fsspec file system registered for `gs://`, with epath told to use fsspec (EPATH_USE_TF=false)
  instead of TensorFlow's own GCS client;
- tensorstore (orbax's array data): its real GCS driver, pointed at a small JSON-API HTTP server
  in this process (TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING).

orbax also asks google-cloud-storage whether a bucket has a hierarchical namespace; that client
is not installed here (and would need the network), so the answer is the one for an ordinary
bucket: no. Objects have generations, and writes and deletes honour `ifGenerationMatch`, which
tensorstore's OCDBT manifests rely on.
"""

from __future__ import annotations

import http.server
import itertools
import json
import os
import threading
import urllib.parse

import fsspec
from fsspec.implementations.local import LocalFileSystem

_GENERATIONS = itertools.count(1)


class FakeGcsFileSystem(LocalFileSystem):
    """`gs://bucket/name` <-> `<root>/bucket/name`; names handed back without the root."""

    protocol = ("gs", "gcs")
    root = ""

    def __init__(self, **kwargs):
        super().__init__(auto_mkdir=True)  # objects need no folders; local files do

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return f"{cls.root}/{path[len(prefix):]}".rstrip("/")
        return super()._strip_protocol(path)

    def _bucket_name(self, local: str) -> str:
        return os.path.relpath(local, self.root)

    def glob(self, path, **kwargs):
        return [self._bucket_name(p) for p in super().glob(path, **kwargs)]


class _Handler(http.server.BaseHTTPRequestHandler):
    """The requests tensorstore's GCS driver sends: media reads (with ranges and generation
    conditions), metadata, listings, media uploads and deletes."""

    protocol_version = "HTTP/1.1"
    root = ""
    generations: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    # -- helpers -------------------------------------------------------------------------------

    def _reply(self, code: int, body: bytes = b"", headers: dict | None = None,
               content_type: str = "application/json"):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _json(self, code: int, data) -> None:
        self._reply(code, json.dumps(data).encode())

    def _route(self):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = url.path.split("/")
        # /storage/v1/b/<bucket>/o[/<object>] or /upload/storage/v1/b/<bucket>/o
        start = parts.index("b")
        bucket = urllib.parse.unquote(parts[start + 1])
        name = urllib.parse.unquote("/".join(parts[start + 3:])) if len(parts) > start + 3 else ""
        return bucket, name, query

    def _file(self, bucket: str, name: str) -> str:
        return os.path.join(self.root, bucket, name)

    def _generation(self, path: str) -> int | None:
        if not os.path.isfile(path):
            return None
        with self.lock:
            # Files written through epath get their generation when the server first sees them.
            key = (path, os.stat(path).st_mtime_ns, os.stat(path).st_size)
            if key not in self.generations:
                self.generations[key] = next(_GENERATIONS)
            return self.generations[key]

    def _precondition_failed(self, query, generation) -> bool:
        if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != (generation or 0):
            return True
        return "ifGenerationNotMatch" in query and generation is not None and \
            int(query["ifGenerationNotMatch"]) == generation

    def _metadata(self, bucket, name, generation, size) -> dict:
        return {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(size),
                "generation": str(generation), "metageneration": "1"}

    # -- methods -------------------------------------------------------------------------------

    def do_GET(self):
        bucket, name, query = self._route()
        if not name and "/o" not in urllib.parse.urlsplit(self.path).path:
            return self._json(200, {"kind": "storage#bucket", "name": bucket})
        if not name:
            return self._list(bucket, query)
        path = self._file(bucket, name)
        generation = self._generation(path)
        if generation is None:
            return self._json(404, {"error": {"code": 404, "message": "No such object"}})
        if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
            return self._reply(304, headers={"x-goog-generation": generation})
        if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
            return self._json(412, {"error": {"code": 412}})
        size = os.path.getsize(path)
        if query.get("alt") != "media":
            return self._json(200, self._metadata(bucket, name, generation, size))
        with open(path, "rb") as f:
            data = f.read()
        headers = {"x-goog-generation": generation, "x-goog-metageneration": 1}
        byte_range = self.headers.get("Range")
        if byte_range:
            first, _, last = byte_range.split("=", 1)[1].partition("-")
            first = int(first) if first else max(0, size - int(last))
            last = int(last) if (last and byte_range.split("=", 1)[1][0] != "-") else size - 1
            part = data[first: last + 1]
            headers["Content-Range"] = f"bytes {first}-{first + len(part) - 1}/{size}"
            return self._reply(206, part, headers, "application/octet-stream")
        return self._reply(200, data, headers, "application/octet-stream")

    def _list(self, bucket, query):
        prefix = query.get("prefix", "")
        start, end = query.get("startOffset", ""), query.get("endOffset")
        items = []
        base = os.path.join(self.root, bucket)
        for folder, _, files in os.walk(base):
            for f in files:
                name = os.path.relpath(os.path.join(folder, f), base)
                if name.startswith(prefix) and name >= start and (end is None or name < end):
                    path = os.path.join(folder, f)
                    items.append(self._metadata(bucket, name, self._generation(path),
                                                os.path.getsize(path)))
        self._json(200, {"kind": "storage#objects", "items": sorted(items, key=lambda i: i["name"])})

    def do_POST(self):
        bucket, _, query = self._route()
        name = query["name"]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self._file(bucket, name)
        if self._precondition_failed(query, self._generation(path)):
            return self._json(412, {"error": {"code": 412, "message": "Precondition Failed"}})
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.upload-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
        self._json(200, self._metadata(bucket, name, self._generation(path), len(body)))

    def do_DELETE(self):
        bucket, name, query = self._route()
        path = self._file(bucket, name)
        generation = self._generation(path)
        if generation is None:
            return self._json(404, {"error": {"code": 404}})
        if self._precondition_failed(query, generation):
            return self._json(412, {"error": {"code": 412}})
        os.remove(path)
        self._reply(204)


def install(root: str) -> http.server.ThreadingHTTPServer:
    """Makes `gs://` mean files under `root` for epath and tensorstore in this process, before
    either is used. Returns the (daemon-threaded) HTTP server."""
    os.makedirs(root, exist_ok=True)
    FakeGcsFileSystem.root = _Handler.root = os.path.abspath(root)
    for protocol in FakeGcsFileSystem.protocol:
        fsspec.register_implementation(protocol, FakeGcsFileSystem, clobber=True)
    os.environ["EPATH_USE_TF"] = "false"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = f"http://127.0.0.1:{server.server_address[1]}"
    os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "fake"  # tensorstore then asks no credentials
    from orbax.checkpoint._src.path import gcs_utils

    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False
    return server
