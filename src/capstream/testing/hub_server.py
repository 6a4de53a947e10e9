"""A small Hugging Face Hub-compatible server for tests: dataset repos in memory, over real HTTP.

It speaks what the real ``huggingface_hub`` (2.4) and ``datasets`` (5.2) clients use to read a
dataset repo and to push one, with ``HF_HUB_DISABLE_XET=1`` (plain LFS uploads):

* read: ``GET /api/datasets/{repo}[/revision/{rev}]`` (info), ``GET .../tree/{rev}[/{path}]``,
  ``POST .../paths-info/{rev}``, ``HEAD``/``GET /datasets/{repo}/resolve/{rev}/{path}`` (with
  ``Range``);
* write: ``POST /api/repos/create``, ``POST /api/validate-yaml``, ``POST .../preupload/{rev}``,
  ``POST /datasets/{repo}.git/info/lfs/objects/batch``, ``PUT /_lfs/{sha256}`` (the upload URL it
  hands out), ``POST .../commit/{rev}`` (ndjson);
* ``GET /api/agent-harnesses`` (asked once by the client) and ``GET /api/whoami-v2``.

Knobs: ``hang`` (accept every connection, never answer), ``fail(route, status, times)`` (answer
the next ``times`` requests of a route with ``status``), ``tokens`` (valid bearer tokens; private
repos and every write need one). Counters: ``calls`` (per route), ``bytes_served`` (per file),
``repos`` (inspect the content).

    with FakeHub(tokens={"hf_secret"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_secret"}
        hub.add_repo("user/images", {"data/train-0.parquet": parquet_bytes})
        ...
        files = hub.files("user/out")          # path -> bytes at the head of main
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .loopback import LoopbackServer

__all__ = ["FakeHub"]

LFS_SUFFIXES = (".parquet", ".arrow", ".jpg", ".jpeg", ".png", ".webp", ".bin", ".tar")


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _File:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def entry(self, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "path": path, "size": len(self.data), "oid": _git_oid(self.data)}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return out


@dataclass
class _Commit:
    oid: str
    message: str
    files: dict[str, _File]
    parent: str | None
    date: float = field(default_factory=time.time)
    added: list[str] = field(default_factory=list)  # paths this commit added or changed


@dataclass
class _Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, _Commit] = field(default_factory=dict)

    def commit(self, rev: str) -> _Commit | None:
        oid = self.branches.get(rev, rev)
        return self.commits.get(oid)

    def add_commit(self, branch: str, message: str, files: dict[str, _File]) -> _Commit:
        parent = self.branches.get(branch)
        oid = hashlib.sha1(f"{self.repo_id}{branch}{len(self.commits)}{time.time()}".encode()).hexdigest()
        commit = _Commit(oid, message, files, parent)
        self.commits[oid] = commit
        self.branches[branch] = oid
        return commit


class FakeHub(LoopbackServer):
    """The server; runs on its own thread and event loop (so subprocesses can use it too)."""

    thread_name = "fake-hub"
    shutdown_timeout_s = 0.5

    def __init__(self, *, tokens: set[str] | None = None, host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.tokens = set(tokens or ())
        self.hang = False
        self.repos: dict[str, _Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.bytes_served: collections.Counter[str] = collections.Counter()  # file path -> bytes sent by GET
        self.auth_seen: list[str | None] = []  # the Authorization header of every request
        self._faults: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition()

    # ------------------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    # ------------------------------------------------------------------------------ test API
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False,
                 branch: str = "main") -> None:
        """Create a dataset repo with one commit holding ``files``."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, _Repo(repo_id, private))
            repo.add_commit(branch, "initial", {p: _File(d, p.endswith(LFS_SUFFIXES)) for p, d in files.items()})

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].commit(rev)
        return {path: f.data for path, f in commit.files.items()} if commit else {}

    def commit_messages(self, repo_id: str, branch: str = "main") -> list[str]:
        return [c.message for c in self.commits(repo_id, branch)]

    def commits(self, repo_id: str, branch: str = "main") -> list[_Commit]:
        """The branch's commits, oldest first."""
        repo, out = self.repos[repo_id], []
        oid = repo.branches.get(branch)
        while oid:
            out.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return out[::-1]

    def wait_for(self, predicate, timeout: float) -> bool:
        """Block until ``predicate()`` is true (checked after every commit) or ``timeout``."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def fail(self, route: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests of ``route`` (e.g. ``"commit"``) with ``status``."""
        with self._lock:
            self._faults.setdefault(route, []).extend([status] * times)

    # ------------------------------------------------------------------------------ routing
    _ROUTES = [
        ("GET", r"/api/agent-harnesses", "harnesses"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/datasets/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", "info"),
        ("GET", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("POST", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>[^/]+)", "branch"),
        ("POST", r"/datasets/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("HEAD", r"/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("GET", r"/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self.hang:  # accept the connection, read the request, never answer
            self.calls["hang"] += 1
            await self._stopping.wait()
            raise web.HTTPServiceUnavailable()
        raw = request.rel_url.raw_path
        self.auth_seen.append(request.headers.get("Authorization"))
        for method, pattern, name in self._ROUTES:
            if request.method != method:
                continue
            match = re.fullmatch(pattern, raw)
            if match:
                self.calls[name] += 1
                with self._lock:
                    faults = self._faults.get(name)
                    status = faults.pop(0) if faults else None
                if status is not None:
                    return web.json_response({"error": f"injected {status}"}, status=status)
                args = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items() if v is not None}
                return await getattr(self, f"_h_{name}")(request, **args)
        self.calls["unknown"] += 1
        return web.json_response({"error": f"fake hub: no route for {request.method} {raw}"}, status=404)

    # ------------------------------------------------------------------------------ helpers
    def _token(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def _authed(self, request: web.Request) -> bool:
        return self._token(request) in self.tokens

    def _repo(self, request: web.Request, repo_id: str, write: bool = False) -> _Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authed(request)):
            raise web.HTTPNotFound(text=json.dumps({"error": "Repository not found"}),
                                   headers={"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"})
        if write and not self._authed(request):
            raise web.HTTPUnauthorized(text=json.dumps({"error": "Invalid credentials"}),
                                       content_type="application/json")
        return repo

    def _commit(self, repo: _Repo, rev: str) -> _Commit:
        commit = repo.commit(rev)
        if commit is None:
            raise web.HTTPNotFound(text=json.dumps({"error": f"Invalid rev id: {rev}"}),
                                   headers={"X-Error-Code": "RevisionNotFound", "Content-Type": "application/json"})
        return commit

    @staticmethod
    def _folders(files: dict[str, _File]) -> set[str]:
        out = set()
        for path in files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                out.add("/".join(parts[:i]))
        return out

    def _entries(self, commit: _Commit, paths: list[str]) -> list[dict[str, Any]]:
        folders = self._folders(commit.files)
        out = []
        for path in paths:
            if path in commit.files:
                out.append(commit.files[path].entry(path))
            elif path in folders:
                out.append({"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0})
        return out

    # ------------------------------------------------------------------------------ handlers
    async def _h_harnesses(self, request):
        return web.json_response({"standardEnvVars": [], "harnesses": {}})

    async def _h_whoami(self, request):
        if not self._authed(request):
            return web.json_response({"error": "Invalid credentials in Authorization header"}, status=401)
        return web.json_response({"type": "user", "name": "tester", "orgs": [],
                                  "auth": {"accessToken": {"role": "write", "displayName": "test"}}})

    async def _h_create(self, request):
        if not self._authed(request):
            return web.json_response({"error": "Invalid credentials"}, status=401)
        body = await request.json()
        repo_id = f"{body.get('organization') or 'tester'}/{body['name']}"
        with self._lock:
            if repo_id in self.repos:
                # The Hub names the existing repo's URL; huggingface_hub's create_repo(exist_ok=True) returns it.
                return web.json_response({"error": "You already created this dataset repo",
                                          "url": f"{self.url}/datasets/{repo_id}"}, status=409)
            repo = self.repos[repo_id] = _Repo(repo_id, body.get("visibility", "public") == "private")
            repo.add_commit("main", "initial commit", {".gitattributes": _File(b"*.parquet filter=lfs diff=lfs merge=lfs -text\n", False)})
        return web.json_response({"url": f"{self.url}/datasets/{repo_id}", "name": repo_id})

    async def _h_validate_yaml(self, request):
        return web.json_response({"errors": [], "warnings": []})

    async def _h_info(self, request, repo, rev="main"):
        r = self._repo(request, repo)
        commit = self._commit(r, rev)
        return web.json_response({
            "id": repo, "author": repo.split("/")[0], "sha": commit.oid, "private": r.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.date)),
            "siblings": [{"rfilename": p} for p in sorted(commit.files)], "cardData": {},
        })

    async def _h_tree(self, request, repo, rev, path=""):
        commit = self._commit(self._repo(request, repo), rev)
        recursive = request.query.get("recursive", "false").lower() == "true"
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        folders = self._folders(commit.files)
        if prefix and prefix[:-1] not in folders:
            return web.json_response({"error": f"{path} does not exist"}, status=404,
                                     headers={"X-Error-Code": "EntryNotFound"})
        names = sorted(p for p in set(commit.files) | folders if p.startswith(prefix) and p != prefix[:-1])
        if not recursive:
            names = [p for p in names if "/" not in p[len(prefix):]]
        return web.json_response(self._entries(commit, names))

    async def _h_paths_info(self, request, repo, rev):
        commit = self._commit(self._repo(request, repo), rev)
        form = await request.post()
        return web.json_response(self._entries(commit, [p.strip("/") for p in form.getall("paths", [])]))

    async def _h_resolve(self, request, repo, rev, path):
        commit = self._commit(self._repo(request, repo), rev)
        f = commit.files.get(path)
        if f is None:
            return web.json_response({"error": "Entry not found"}, status=404, headers={"X-Error-Code": "EntryNotFound"})
        etag = f'"{f.sha256 if f.lfs else _git_oid(f.data)}"'
        headers = {"X-Repo-Commit": commit.oid, "ETag": etag, "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(f.data))})
        data, status = f.data, 200
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", request.headers.get("Range", ""))
        if ranged:
            a, b = ranged.groups()
            start = int(a) if a else max(0, len(f.data) - int(b))
            end = min(int(b), len(f.data) - 1) if a and b else len(f.data) - 1
            data, status = f.data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(f.data)}"
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return web.Response(status=status, headers=headers)
        self.bytes_served[path] += len(data)
        return web.Response(body=data, status=status, headers=headers, content_type="application/octet-stream")

    async def _h_preupload(self, request, repo, rev):
        r = self._repo(request, repo, write=True)
        commit = r.commit(rev)
        body = await request.json()
        out = []
        for item in body["files"]:
            path = item["path"]
            existing = commit.files.get(path) if commit else None
            out.append({"path": path, "uploadMode": "lfs" if path.endswith(LFS_SUFFIXES) else "regular",
                        "shouldIgnore": False, "oid": existing and _git_oid(existing.data)})
        return web.json_response({"files": out, "commitOid": commit.oid if commit else None})

    async def _h_lfs_batch(self, request, repo):
        self._repo(request, repo, write=True)
        body = await request.json()
        objects = []
        for obj in body["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_store:
                entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{obj['oid']}"}}
            objects.append(entry)
        return web.json_response({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    async def _h_lfs_put(self, request, oid):
        data = await request.read()
        if hashlib.sha256(data).hexdigest() != oid:
            return web.json_response({"error": "sha256 mismatch"}, status=400)
        with self._lock:
            self.lfs_store[oid] = data
        return web.Response(status=200)

    async def _h_branch(self, request, repo, branch):
        r = self._repo(request, repo, write=True)
        with self._lock:
            if branch in r.branches:
                return web.json_response({"error": "Reference already exists"}, status=409)
            r.branches[branch] = r.branches["main"]
        return web.json_response({})

    async def _h_commit(self, request, repo, rev):
        r = self._repo(request, repo, write=True)
        lines = [json.loads(line) for line in (await request.read()).splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        with self._lock:
            base = r.commit(rev)
            if base is None and rev in r.branches:
                return web.json_response({"error": "bad branch"}, status=400)
            parent = header.get("parentCommit")
            if parent and base is not None and parent != base.oid:
                return web.json_response({"error": "A commit has happened since"}, status=412)
            files = dict(base.files) if base else {}
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = _File(base64.b64decode(value["content"]), False)
                elif item["key"] == "lfsFile":
                    data = self.lfs_store.get(value["oid"])
                    if data is None:
                        return web.json_response({"error": f"LFS object {value['oid']} not uploaded"}, status=422)
                    files[value["path"]] = _File(data, True)
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] == "deletedFolder":
                    files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            commit = r.add_commit(rev, header["summary"], files)
            commit.added = [x["value"]["path"] for x in lines if x["key"] in ("file", "lfsFile")]
        with self._changed:
            self._changed.notify_all()
        return web.json_response({"commitUrl": f"{self.url}/datasets/{repo}/commit/{commit.oid}",
                                  "commitOid": commit.oid, "success": True})
