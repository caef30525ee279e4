"""A Hugging Face Hub on localhost for tests: the dataset endpoints that huggingface_hub's ``HfApi`` and
``HfFileSystem`` call (revision info, tree, paths-info, and file reads with byte ranges), served from local
folders, one folder per commit. It logs every file read, so a test can check what streaming fetches.

Only what reading a dataset needs is served; anything else answers 404, so a client that starts calling another
endpoint fails the test instead of passing unseen."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

_API = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree|paths-info)/(?P<rest>.*))?$")
_RESOLVE = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


@dataclass
class Dataset:
    """A hub dataset: commits (sha -> folder of its files) and refs (branch or tag -> sha)."""

    commits: dict[str, Path] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Read:
    """One file read: the commit and file, and the bytes [start, end) served."""

    commit: str
    path: str
    start: int
    end: int


class LocalHub:
    """``with LocalHub() as hub``: a server on a free port; ``hub.endpoint`` for ``HF_ENDPOINT``."""

    def __init__(self) -> None:
        self.datasets: dict[str, Dataset] = {}
        self.reads: list[Read] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commit(self, repo: str, sha: str, folder: Path, branch: str = "main") -> None:
        """Add commit ``sha`` of dataset ``repo`` with the files of ``folder``, and move ``branch`` to it."""
        dataset = self.datasets.setdefault(repo, Dataset())
        dataset.commits[sha] = folder
        dataset.refs[branch] = sha

    def bytes_read(self) -> int:
        with self._lock:
            return sum(read.end - read.start for read in self.reads)

    def _record(self, read: Read) -> None:
        with self._lock:
            self.reads.append(read)

    def _folder(self, repo: str, revision: str) -> tuple[str, Path] | None:
        dataset = self.datasets.get(repo)
        if dataset is None:
            return None
        sha = dataset.refs.get(revision, revision)
        return (sha, dataset.commits[sha]) if sha in dataset.commits else None


def _entry(root: Path, path: Path) -> dict:
    relative = path.relative_to(root).as_posix()
    oid = hashlib.sha1(relative.encode()).hexdigest()
    if path.is_dir():
        return {"type": "directory", "path": relative, "oid": oid}
    return {"type": "file", "path": relative, "oid": oid, "size": path.stat().st_size}


def _handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet: pytest shows failures, not access logs
            pass

        def _json(self, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _missing(self, code: str) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            url = urlsplit(self.path)
            if match := _API.match(url.path):
                return self._api(match, parse_qs(url.query))
            if match := _RESOLVE.match(url.path):
                return self._file(match)
            self._missing("EntryNotFound")

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def do_POST(self) -> None:  # noqa: N802
            match = _API.match(urlsplit(self.path).path)
            length = int(self.headers.get("Content-Length", 0))
            form = parse_qs(self.rfile.read(length).decode())
            if match is None or match["kind"] != "paths-info":
                return self._missing("EntryNotFound")
            found = hub._folder(unquote(match["repo"]), unquote(match["rest"]))
            if found is None:
                return self._missing("RevisionNotFound")
            _, root = found
            self._json([_entry(root, root / p) for p in form.get("paths", []) if (root / p).exists()])

        def _api(self, match: re.Match, query: dict) -> None:
            repo = unquote(match["repo"])
            revision, _, inside = (match["rest"] or "main").partition("/")  # no revision: main
            found = hub._folder(repo, unquote(revision))
            if found is None:
                return self._missing("RepoNotFound" if repo not in hub.datasets else "RevisionNotFound")
            sha, root = found
            if match["kind"] in ("revision", None):
                files = [_entry(root, p) for p in sorted(root.rglob("*")) if p.is_file()]
                return self._json({"id": repo, "sha": sha, "private": False,
                                   "siblings": [{"rfilename": f["path"]} for f in files]})
            folder = root / unquote(inside)
            if not folder.is_dir():
                return self._missing("EntryNotFound")
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            children = sorted(folder.rglob("*") if recursive else folder.iterdir())
            self._json([_entry(root, p) for p in children])

        def _file(self, match: re.Match) -> None:
            found = hub._folder(unquote(match["repo"]), unquote(match["revision"]))
            path = found and found[1] / unquote(match["path"])
            if path is None or not path.is_file():
                return self._missing("EntryNotFound")
            size = path.stat().st_size
            start, end = 0, size
            if ranged := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                start, end = int(ranged[1]), min(size, int(ranged[2]) + 1 if ranged[2] else size)
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{hashlib.sha1(str(path).encode()).hexdigest()}"')
            self.send_header("X-Repo-Commit", found[0])
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if self.command == "GET":
                with path.open("rb") as file:
                    file.seek(start)
                    self.wfile.write(file.read(end - start))
                hub._record(Read(found[0], str(path.relative_to(found[1])), start, end))

    return Handler
