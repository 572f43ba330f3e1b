"""A small Hub-compatible HTTP server for tests (standard library only).

It implements what the real huggingface_hub client calls to create a repo, upload (preupload,
LFS batch + basic PUT + verify), commit (ndjson, parent-commit guard, pull requests), create a
branch, and read back (revision info, tree, resolve with HEAD/GET and the headers hf_hub_download
needs). It does not speak Xet: uploads need HF_HUB_DISABLE_XET, and downloads fall back to plain
HTTP because no X-Xet-Hash header is sent. Failures can be injected per route (`fail`).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: dict = field(default_factory=dict)  # sha -> {"parent", "files": {path: bytes}, "lfs": set(paths)}
    refs: dict = field(default_factory=dict)  # "main", "refs/pr/1", ... -> sha
    prs: int = 0

    def lfs_paths(self, sha) -> set:
        attrs = self.commits[sha]["files"].get(".gitattributes", b"").decode()
        pats = [line.split()[0] for line in attrs.splitlines() if "filter=lfs" in line]
        return {p for p in self.commits[sha]["files"] if any(fnmatch.fnmatch(p, pat) for pat in pats)}


class State:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.calls: list[tuple[str, str, str]] = []  # (method, route, path)
        self.fail: dict[str, int] = {}  # route -> status code to answer with (route "*" = every request)
        self.lock = threading.Lock()
        self.counter = 0

    def commit(self, repo: Repo, parent: str | None, files: dict, message: str) -> str:
        self.counter += 1
        sha = hashlib.sha1(
            json.dumps([parent, sorted((p, git_oid(d)) for p, d in files.items()), message, self.counter]).encode()
        ).hexdigest()
        repo.commits[sha] = {"parent": parent, "files": files, "message": message}
        return sha


class HubServer:
    """`with HubServer(token) as hub:` serves on 127.0.0.1 at hub.url (a free port)."""

    def __init__(self, token: str):
        self.state = State(token)
        state = self.state

        class Handler(_Handler):
            pass

        Handler.state = state
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        Handler.base = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.state.repos[repo_id]
        return dict(repo.commits[repo.refs[revision]]["files"])

    def routes(self) -> list[str]:
        return [r for _, r, _ in self.state.calls]


class HubError(Exception):
    def __init__(self, status, message, code=None, headers=None, extra=None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra or {}


ROUTES = [  # (method, regex, route name)
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/xet-(?:read|write)-token/(?P<rev>.+)", "xet_token"),
    ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)", "create_branch"),
    ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("POST", r"/_lfs/(?P<oid>[0-9a-f]{64})/verify", "lfs_verify"),
    ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
WRITES = {"create_repo", "preupload", "commit", "create_branch", "lfs_batch", "validate_yaml"}


class _Handler(BaseHTTPRequestHandler):
    state: State
    base: str
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status, body=b"", headers=None, head=False):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _dispatch(self, method):
        url = urlsplit(self.path)
        body = self._body() if method in ("POST", "PUT") else b""
        for m, pattern, route in ROUTES:  # noqa: B007 (route is read after the loop)
            match = re.fullmatch(pattern, url.path)
            if m == method and match:
                break
        else:
            route, match = None, None
        with self.state.lock:
            self.state.calls.append((method, route or "unknown", url.path))
            try:
                if route is None:
                    raise HubError(404, f"test hub: no route for {method} {url.path}")
                status = self.state.fail.get(route) or self.state.fail.get("*")
                if status:
                    raise HubError(status, f"test hub: injected failure on {route}")
                self._auth(route, match)
                params = {k: v[0] for k, v in parse_qs(url.query).items()}
                status, out, headers = getattr(self, route)(
                    **{k: unquote(v) for k, v in match.groupdict().items() if v is not None}, body=body, params=params
                )
            except HubError as e:
                status, out, headers = (
                    e.status,
                    {"error": e.message, **e.extra},
                    {**e.headers, **({"X-Error-Code": e.code} if e.code else {})},
                )
        self._send(status, out, headers, head=method == "HEAD")

    # --- helpers
    def _auth(self, route, match):
        given = self.headers.get("Authorization")
        if given is not None and given != f"Bearer {self.state.token}":
            raise HubError(
                401,
                "Invalid credentials in Authorization header",
                headers={"X-Error-Message": "Invalid credentials in Authorization header"},
            )
        if route in WRITES and given is None:
            raise HubError(401, "You must be authenticated to access this endpoint")
        repo = match.groupdict().get("repo") if match else None
        if repo in self.state.repos and self.state.repos[repo].private and given is None:
            raise HubError(401, "Repository not found", "RepoNotFound")

    def _repo(self, repo_id) -> Repo:
        if repo_id not in self.state.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self.state.repos[repo_id]

    def _head(self, repo: Repo, rev: str) -> str:
        if rev in repo.refs:
            return repo.refs[rev]
        if rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _entry(self, repo, sha, path):
        data = repo.commits[sha]["files"][path]
        e = {"type": "file", "path": path, "size": len(data), "oid": git_oid(data)}
        if path in repo.lfs_paths(sha):
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return e

    # --- routes
    def create_repo(self, body, params):
        d = json.loads(body)
        repo_id = f"{d.get('organization') or 'user'}/{d['name']}"
        if repo_id in self.state.repos:
            # like the Hub, a 409 still says where the repository is (create_repo(exist_ok=True) reads it)
            raise HubError(409, "You already created this model repo", extra={"url": f"{self.base}/{repo_id}"})
        private = d.get("private") is True or d.get("visibility") == "private"
        repo = self.state.repos[repo_id] = Repo(private=private)
        repo.refs["main"] = self.state.commit(repo, None, {".gitattributes": GITATTRIBUTES}, "initial commit")
        return 200, {"url": f"{self.base}/{repo_id}", "name": repo_id}, {}

    def validate_yaml(self, body, params):
        import yaml

        content = json.loads(body)["content"]
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---", 2)[1])
                assert isinstance(meta, dict), "metadata must be a mapping"
            except Exception as e:  # noqa: BLE001
                return 400, {"errors": [{"message": f"invalid YAML: {e}"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def repo_info(self, repo, body, params, rev="main"):
        r = self._repo(repo)
        sha = self._head(r, rev)
        meta = {}
        readme = r.commits[sha]["files"].get("README.md", b"").decode()
        if readme.startswith("---"):
            import yaml

            meta = yaml.safe_load(readme.split("---", 2)[1]) or {}
        return (
            200,
            {
                "id": repo,
                "modelId": repo,
                "sha": sha,
                "private": r.private,
                "cardData": meta,
                "tags": meta.get("tags", []),
                "siblings": [{"rfilename": p} for p in sorted(r.commits[sha]["files"])],
            },
            {},
        )

    def tree(self, repo, rev, body, params, path=""):
        r = self._repo(repo)
        sha = self._head(r, rev)
        prefix = path.rstrip("/") + "/" if path else ""
        files = sorted(p for p in r.commits[sha]["files"] if p.startswith(prefix))
        if path and not files:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        if params.get("recursive") not in ("True", "true", "1"):
            dirs = sorted({prefix + p[len(prefix) :].split("/")[0] for p in files if "/" in p[len(prefix) :]})
            return (
                200,
                [self._entry(r, sha, p) for p in files if "/" not in p[len(prefix) :]]
                + [{"type": "directory", "path": d, "oid": git_oid(d.encode()), "size": 0} for d in dirs],
                {},
            )
        return 200, [self._entry(r, sha, p) for p in files], {}

    def xet_token(self, repo, rev, body, params):
        raise HubError(501, "this test hub does not speak Xet; set HF_HUB_DISABLE_XET=1")

    def preupload(self, repo, rev, body, params):
        r = self._repo(repo)
        sha = self._head(r, rev)
        current, lfs = r.commits[sha]["files"], r.lfs_paths(sha)
        pats = [ln.split()[0] for ln in current.get(".gitattributes", b"").decode().splitlines() if "filter=lfs" in ln]
        out = []
        for f in json.loads(body)["files"]:
            is_lfs = any(fnmatch.fnmatch(f["path"], p) for p in pats) or f["size"] > 10_000_000
            old = current.get(f["path"])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if f["path"] in lfs else git_oid(old))
            out.append({"path": f["path"], "uploadMode": "lfs" if is_lfs else "regular", "shouldIgnore": False, "oid": oid})
        return 200, {"files": out, "commitOid": sha}, {}

    def lfs_batch(self, repo, body, params):
        self._repo(repo)
        d = json.loads(body)
        objects = []
        for o in d["objects"]:
            entry = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.state.lfs:
                entry["authenticated"] = True
                entry["actions"] = {
                    "upload": {"href": f"{self.base}/_lfs/{o['oid']}"},
                    "verify": {"href": f"{self.base}/_lfs/{o['oid']}/verify"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def lfs_upload(self, oid, body, params):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "sha256 of the uploaded content does not match the oid")
        self.state.lfs[oid] = body
        return 200, b"", {}

    def lfs_verify(self, oid, body, params):
        d = json.loads(body)
        if oid not in self.state.lfs or len(self.state.lfs[oid]) != d["size"]:
            raise HubError(404, "object not uploaded")
        return 200, {}, {}

    def create_branch(self, repo, branch, body, params):
        r = self._repo(repo)
        if branch in r.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        r.refs[branch] = self._head(r, start)
        return 200, {}, {}

    def commit(self, repo, rev, body, params):
        r = self._repo(repo)
        head = self._head(r, rev)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        parent = header.get("parentCommit")
        pr = params.get("create_pr") == "1"
        if parent is not None and not pr and parent != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        base = parent if (pr and parent) else head
        files = dict(r.commits[base]["files"])
        for x in lines:
            v = x["value"]
            if x["key"] == "file":
                files[v["path"]] = base64.b64decode(v["content"])
            elif x["key"] == "lfsFile":
                if v["oid"] not in self.state.lfs:
                    raise HubError(400, f"LFS object {v['oid']} of {v['path']} was never uploaded")
                files[v["path"]] = self.state.lfs[v["oid"]]
            elif x["key"] == "deletedFile":
                files.pop(v["path"], None)
        sha = self.state.commit(r, base, files, header["summary"])
        pr_url = None
        if pr:
            r.prs += 1
            r.refs[f"refs/pr/{r.prs}"] = sha
            pr_url = f"{self.base}/{repo}/discussions/{r.prs}"
        else:
            r.refs[rev] = sha
        return 200, {"commitUrl": f"{self.base}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url}, {}

    def resolve(self, repo, rev, path, body, params):
        r = self._repo(repo)
        sha = self._head(r, rev)
        files = r.commits[sha]["files"]
        if path not in files:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": sha})
        data = files[path]
        headers = {"X-Repo-Commit": sha, "Content-Type": "application/octet-stream"}
        if path in r.lfs_paths(sha):
            etag = hashlib.sha256(data).hexdigest()
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        else:
            etag = git_oid(data)
        headers["ETag"] = f'"{etag}"'
        return 200, data, headers
