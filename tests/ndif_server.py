"""A loopback server that speaks nnsight 0.8.1's remote (NDIF) protocol, for tests without internet.

The protocol, as the client in ``nnsight/intervention/backends/remote.py`` uses it:

* ``GET /subscribe`` is a websocket; the server's first message is ``{"session_id": ...}``;
  every later status update of a job sent with that session id arrives on it: JSON text frames
  (``ResponseModel``), and the COMPLETED one as a binary frame, ``ResponseModel.pickle()`` whose
  ``data`` is the result blob itself (``torch.save`` of the saved values, zstd-compressed when
  the request was).
* ``POST /request`` is multipart: field ``data`` (the ``RequestModel`` JSON envelope: model key,
  session id, compress, env) and file ``blob`` (the serialised trace). The API key comes in the
  ``ndif-api-key`` header. It answers with a RECEIVED ``ResponseModel`` (JSON), or an HTTP error
  whose JSON ``detail`` nnsight shows to the user.

Requests run here exactly as a server runs them: the model named by the key (a Hub id, mapped
to a local directory since nothing can be downloaded) is built with nnsight's
``TransformersModel`` (weights loaded), the request's env is applied with
``_remoteable_set_env``, the trace is rebuilt with ``RequestModel.deserialize`` against the
model's persistent objects and executed; what it saved goes back. Nothing of the client's
process is shared: the server runs in its own process (:func:`start`), like a real one.

Failure modes for the error-path tests, set at start or at any time with ``POST /_test/config``
(JSON): ``fail_status=503`` answers POST /request with that HTTP status for the next
``fail_times`` requests (a transient outage); ``fail_job=MESSAGE`` ends every job with an ERROR
status carrying MESSAGE (a failure on the server). ``GET /_test/stats`` counts the requests.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

KEY_HEADER = "ndif-api-key"


class Server:
    def __init__(self, models: dict[str, str], api_key: str | None, *, fail_status: int = 0, fail_times: int = 0,
                 fail_job: str = "", log=None):
        self.models = models  # Hub id -> local directory
        self.api_key = api_key
        self.fail_status = fail_status
        self.fail_times = fail_times
        self.fail_job = fail_job
        self.sessions: dict = {}
        self.loaded: dict = {}
        self.lock = threading.Lock()  # one job at a time, as one model replica would
        self.requests = 0
        self.log = log or (lambda msg: None)

    # ------------------------------------------------------------ model and execution

    def model(self, model_key: str):
        from nnsight.modeling.transformers import TransformersModel
        from transformers import AutoProcessor

        cls_path, _, suffix = model_key.partition(":")
        if cls_path != "nnsight.modeling.transformers.TransformersModel":
            raise ValueError(f"this server runs TransformersModel keys only, got {cls_path}")
        spec = json.loads(suffix)
        repo_id = spec["repo_id"]
        if repo_id not in self.models:
            raise ValueError(f"model {repo_id} is not deployed here (deployed: {', '.join(self.models)})")
        if model_key not in self.loaded:
            path = self.models[repo_id]
            processor = AutoProcessor.from_pretrained(path)
            self.loaded[model_key] = TransformersModel(path, task=spec.get("task"), processor=processor,
                                                       tokenizer=processor.tokenizer, dispatch=True)
        return self.loaded[model_key]

    def execute(self, request: dict, blob: bytes) -> bytes:
        """Run one request; the torch.save bytes of what it saved (compressed like the request)."""
        import torch
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import _saves, dec, inc

        if self.fail_job:
            raise RuntimeError(self.fail_job)
        model = self.model(request["model_key"])
        model._remoteable_set_env(request.get("env") or {})
        tracer = RequestModel.deserialize(blob, model._remoteable_persistent_objects(), compress=request["compress"])
        inc()  # the outermost trace: its push_result writes back only what was saved
        try:
            tracer.execute(tracer.info.code)
            saved = _saves()
            result = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saved}
        finally:
            dec()
        buffer = io.BytesIO()
        torch.save(result, buffer)
        data = buffer.getvalue()
        if request["compress"]:
            import zstandard

            data = zstandard.ZstdCompressor(level=6).compress(data)
        return data

    # ------------------------------------------------------------ HTTP and websocket

    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/subscribe", self.subscribe)
        app.router.add_post("/request", self.request)
        app.router.add_post("/_test/config", self.configure)
        app.router.add_get("/_test/stats", lambda request: web.json_response({"requests": self.requests}))
        return app

    async def configure(self, request):
        from aiohttp import web

        body = await request.json()
        for name in ("fail_status", "fail_times", "fail_job"):
            if name in body:
                setattr(self, name, body[name])
        return web.json_response({"ok": True})

    async def subscribe(self, request):
        from aiohttp import web

        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        session = uuid.uuid4().hex
        self.sessions[session] = ws
        await ws.send_str(json.dumps({"session_id": session}))
        try:
            async for _ in ws:  # the client sends nothing; wait until it closes
                pass
        finally:
            self.sessions.pop(session, None)
        return ws

    async def request(self, request):
        from aiohttp import web
        from nnsight.schema.response import ResponseModel, Status

        self.requests += 1
        if self.api_key is not None and request.headers.get(KEY_HEADER) != self.api_key:
            # Never echo the key that was sent.
            return web.json_response({"detail": "Invalid API key."}, status=401)
        if self.fail_status and self.fail_times > 0:
            self.fail_times -= 1
            return web.json_response({"detail": "Service temporarily unavailable."}, status=self.fail_status)
        form = await request.post()
        envelope = json.loads(form["data"])
        blob = form["blob"].file.read()
        job = uuid.uuid4().hex
        ws = self.sessions.get(envelope.get("session_id"))
        if ws is None:
            return web.json_response({"detail": "unknown session"}, status=400)
        asyncio.get_running_loop().create_task(self.run(job, envelope, blob, ws))
        return web.Response(text=ResponseModel(id=job, status=Status.RECEIVED).model_dump_json(),
                            content_type="application/json")

    async def run(self, job: str, envelope: dict, blob: bytes, ws) -> None:
        from nnsight.schema.response import ResponseModel, Status

        await ws.send_str(ResponseModel(id=job, status=Status.RUNNING).model_dump_json())

        def work():
            with self.lock:
                return self.execute(envelope, blob)

        try:
            data = await asyncio.get_running_loop().run_in_executor(None, work)
        except Exception as e:  # noqa: BLE001 -- any failure of a job is reported to its client
            self.log(f"job {job} failed: {type(e).__name__}: {e}")
            await ws.send_str(ResponseModel(id=job, status=Status.ERROR, description=f"{type(e).__name__}: {e}")
                              .model_dump_json())
            return
        await ws.send_bytes(ResponseModel(id=job, status=Status.COMPLETED, data=data).pickle())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(server: Server, port: int) -> None:
    from aiohttp import web

    web.run_app(server.app(), host="127.0.0.1", port=port, print=None, handle_signals=True)


def start(models: dict[str, str], *, api_key: str | None, env: dict | None = None, log: Path | None = None,
          **fail) -> tuple[subprocess.Popen, str]:
    """Run the server in its own process on a free port; (process, its http:// URL) once it answers."""
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--port", str(port), "--models", json.dumps(models)]
    for k, v in fail.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    child_env = {**os.environ, **(env or {})}
    if api_key is not None:
        child_env["TEST_NDIF_SERVER_KEY"] = api_key  # not on the command line, where ps would show it
    with open(log or os.devnull, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=child_env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the test NDIF server exited with {proc.returncode}" + (f"; log: {log}" if log else ""))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the test NDIF server did not start within 60 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--models", required=True, help='JSON {"hub/id": "/local/dir"}')
    p.add_argument("--fail-status", type=int, default=0)
    p.add_argument("--fail-times", type=int, default=0)
    p.add_argument("--fail-job", default="")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    server = Server(json.loads(args.models), os.environ.get("TEST_NDIF_SERVER_KEY"), fail_status=args.fail_status,
                    fail_times=args.fail_times, fail_job=args.fail_job, log=lambda m: print(m, flush=True))
    serve(server, args.port)


if __name__ == "__main__":
    main()
