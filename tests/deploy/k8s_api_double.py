"""A Kubernetes API server double for the pod list + watch calls of the official client.

``GET /api/v1/namespaces/{ns}/pods`` answers a PodList of the stored pods that match ``labelSelector``
(equality terms); with ``watch=true`` it streams newline-delimited watch events (chunked, as the API
server does) from the moment of the call until the test drops the watches or the server stops. Tests
change the store with ``put`` / ``delete`` (which emit ADDED / MODIFIED / DELETED), can inject an
ERROR event (410 Gone) and cut every open watch to force a reconnect.
"""

from __future__ import annotations

import copy
import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

_CUT = object()


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class K8sApiDouble:
    def __init__(self, namespace: str, port: int = 0) -> None:
        self.namespace = namespace
        self.pods: dict[str, dict[str, Any]] = {}
        self.rv = 100
        self.lock = threading.Lock()
        self.watchers: list[tuple[str, queue.Queue]] = []
        self.requests: list[dict[str, list[str]]] = []  # query of every pods call
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path != f"/api/v1/namespaces/{double.namespace}/pods":
                    self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                     "reason": "NotFound", "message": f"{url.path} not found"})
                    return
                query = parse_qs(url.query)
                double.requests.append(query)
                selector = query.get("labelSelector", [""])[0]
                if query.get("watch", ["false"])[0] == "true":
                    self._watch(selector)
                else:
                    self._json(200, double.pod_list(selector))

            def _json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _watch(self, selector: str) -> None:
                q: queue.Queue = queue.Queue()
                with double.lock:
                    double.watchers.append((selector, q))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    while True:
                        event = q.get()
                        if event is _CUT:
                            break
                        line = json.dumps(event).encode() + b"\n"
                        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass
                finally:
                    with double.lock:
                        double.watchers = [w for w in double.watchers if w[1] is not q]
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> K8sApiDouble:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.cut_watches()
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ store
    def pod_list(self, selector: str) -> dict:
        with self.lock:
            items = [copy.deepcopy(p) for p in self.pods.values() if _matches(p["metadata"]["labels"], selector)]
            return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)},
                    "items": items}

    def _emit(self, kind: str, obj: dict) -> None:
        for selector, q in list(self.watchers):
            if kind == "ERROR" or _matches(obj["metadata"]["labels"], selector):
                q.put({"type": kind, "object": copy.deepcopy(obj)})

    def put(self, pod: dict, emit: bool = True) -> None:
        with self.lock:
            self.rv += 1
            pod["metadata"]["resourceVersion"] = str(self.rv)
            name = pod["metadata"]["name"]
            kind = "MODIFIED" if name in self.pods else "ADDED"
            self.pods[name] = copy.deepcopy(pod)
            if emit:
                self._emit(kind, pod)

    def delete(self, name: str, emit: bool = True) -> None:
        with self.lock:
            self.rv += 1
            pod = self.pods.pop(name)
            pod["metadata"]["resourceVersion"] = str(self.rv)
            if emit:
                self._emit("DELETED", pod)

    def gone(self) -> None:
        """An ERROR event as the API server sends when the watch's resourceVersion is too old."""
        with self.lock:
            self._emit("ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                 "message": "too old resource version", "reason": "Expired", "code": 410})

    def cut_watches(self) -> None:
        with self.lock:
            for _, q in self.watchers:
                q.put(_CUT)

    def open_watches(self) -> int:
        with self.lock:
            return len(self.watchers)
