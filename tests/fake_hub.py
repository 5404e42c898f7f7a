"""A local HTTP server speaking the three Hub endpoints ``huggingface_hub`` uses to create a repo and commit files.

``POST /api/repos/create``, ``POST /api/{type}s/{repo}/preupload/{rev}`` (every file answered as a regular,
inline upload) and ``POST /api/{type}s/{repo}/commit/{rev}`` (NDJSON with base64 file contents). Files land in
``FakeHub.repos[repo_id][path]``; every request is logged with its ``Authorization`` header.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, fail_commits: bool = False):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.private: dict[str, bool] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.fail_commits = fail_commits
        self.create_bodies: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                self._send(404, {"error": "not found"})

            def do_POST(self):  # noqa: N802
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
                if self.path == "/api/repos/create":
                    body = json.loads(data)
                    repo = (body["organization"] + "/" if body.get("organization") else "") + body["name"]
                    hub.repos.setdefault(repo, {})
                    private = bool(body.get("private")) or body.get("visibility") == "private"
                    hub.private[repo] = hub.private.get(repo, False) or private
                    hub.create_bodies.append(body)
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if self.path == "/api/validate-yaml":
                    import yaml

                    content = json.loads(data)["content"]
                    try:
                        yaml.safe_load(content.split("---")[1] if content.startswith("---") else content)
                    except yaml.YAMLError as err:
                        return self._send(400, {"error": str(err)})
                    return self._send(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(data)["files"]
                    return self._send(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                if "/commit/" in self.path:
                    if hub.fail_commits:
                        return self._send(500, {"error": "storage is down"})
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    for line in data.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.repos.setdefault(repo, {})[item["value"]["path"]] = base64.b64decode(
                                item["value"]["content"]
                            )
                        elif item["key"] == "deletedFile":
                            hub.repos.get(repo, {}).pop(item["value"]["path"], None)
                    return self._send(
                        200,
                        {
                            "commitUrl": f"{hub.url}/{repo}/commit/{'0' * 40}",
                            "commitOid": "0" * 40,
                            "pullRequestUrl": None,
                        },
                    )
                self._send(404, {"error": self.path})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
