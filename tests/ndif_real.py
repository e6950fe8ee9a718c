"""NDIF's own server code (the ``ndif`` 0.1.2 package) on 127.0.0.1, for tests/test_ndif_real.py.

Unchanged from the package, in two processes (see below): the API service
(``ndif.services.api.app``: its FastAPI app under uvicorn, /request, /subscribe, auth, redis
use), the queue (``Dispatcher``, ``Processor``, ``Replica``: the request list in redis,
per-model queues, status replies) and the model actor (``BaseModelDeployment``: ``run``, ``execute``, ``prepare_result``, its
responses published through redis, deserialisation by ``BackendRequestModel.deserialize`` and
execution by ``nns.execute_traced_block``). A real ``redis-server`` is started by the test.

Replaced, and only this (the GPU-cluster plumbing and the user database):

* Ray: ``ndif.common.providers.ray`` becomes a module of the same names whose controller and
  actor handles call plain objects in this process (``x.remote(...)`` returns the coroutine
  of ``x(...)``); ``ray`` and ``ray.exceptions`` are stub modules (``@ray.remote`` is the
  identity, the two exception classes the queue catches). The controller's placement is a
  dict: a model key deploys when its Hub id is in ``--models``, else the deploy is refused
  with a ``DeploymentError`` reason naming it (the path a Hub id NDIF does not serve takes).
* ``BaseModelDeployment.load_from_disk``: the weights load on the CPU with nnsight's own
  ``HuggingFaceModel.from_model_key`` (no GPU placement, no device check); the constructor's
  telemetry connects and Ray runtime context are skipped; ``torch.cuda.synchronize`` (called
  after each request) is a no-op on this CUDA-less torch.
* Postgres (API keys): ``PostgresProvider.enabled`` is true and ``fetch`` answers the key
  query with one row for the key in ``TEST_NDIF_SERVER_KEY`` (none for any other key), so
  NDIF's ``verify_api_key`` runs its real 401/400/403 policy.
* The object store (MinIO/S3) is not configured: results here are far below the inline limit
  that ``RedisProvider.max_publish_bytes`` derives from the real redis, so the actor hands them
  back over the socket and never uploads.

Two processes, as NDIF deploys them (gunicorn's API worker, and the queue it spawns beside it):
``python tests/ndif_real.py api --port P --redis URL`` and ``python tests/ndif_real.py queue
--redis URL --models '{"hub/id": "float32"}'``; the weights come from the Hugging Face cache in
``HF_HOME`` (offline). :func:`start` runs redis and both.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

NDIF_VERSION = "0.1.2"


def _stub_ray() -> None:
    """``ray`` and ``ray.exceptions``: the names the queue and the actor module import."""
    ray = types.ModuleType("ray")
    exceptions = types.ModuleType("ray.exceptions")

    class ActorDiedError(Exception):
        pass

    class ActorUnavailableError(Exception):
        pass

    exceptions.ActorDiedError, exceptions.ActorUnavailableError = ActorDiedError, ActorUnavailableError
    ray.exceptions = exceptions
    ray.remote = lambda *args, **kwargs: (args[0] if args and not kwargs else (lambda cls: cls))
    ray.get_runtime_context = lambda: None
    sys.modules["ray"], sys.modules["ray.exceptions"] = ray, exceptions


class _Method:
    """A Ray actor method as the queue calls it: ``await handle.method.remote(...)``."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        result = self.fn(*args, **kwargs)
        if asyncio.iscoroutine(result):
            return result

        async def done():
            return result
        return done()


class _Handle:
    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        if name == "__ray_ready__":
            return _Method(lambda: None)
        return _Method(getattr(self.target, name))


class Controller:
    """The cluster's placement, as a dict: one CPU replica per deployable model key."""

    def __init__(self, models: dict[str, str]):
        self.models = models  # Hub id -> dtype
        self.actors: dict = {}  # (model_key, replica_id) -> actor

    def _repo(self, model_key: str) -> str:
        return json.loads(model_key.partition(":")[2]).get("repo_id", "")

    async def get_deployment(self, model_key):
        from ndif.common.schema.controller import ReplicaState, ReplicaStates

        return ReplicaStates(replicas=[
            ReplicaState(model_key=k, replica_id=r, deployment_level="hot", gpus={}, size_bytes=0, pinned=False, deployed=0.0)
            for (k, r) in self.actors if k == model_key])

    async def scale(self, model_key, replicas, config):
        from ndif.common.schema.controller import DeployResponse, ModelDeployResult
        from ndif.services.ray.deployments.modeling.base import ModelActor

        repo = self._repo(model_key)
        if repo not in self.models:
            return DeployResponse(results={model_key: ModelDeployResult(
                error=f"Repository Not Found for {repo}: this cluster does not serve it")})
        replica_id = uuid.uuid4().hex[:8]
        actor = await asyncio.to_thread(ModelActor, model_key, dtype=self.models[repo])
        self.actors[(model_key, replica_id)] = actor
        return DeployResponse(results={model_key: ModelDeployResult(replicas=[replica_id])}, change=True)

    def actor(self, model_key, replica_id):
        try:
            return self.actors[(model_key, replica_id)]
        except KeyError:
            raise ValueError(f"no actor {replica_id} for {model_key}") from None


def _stub_ray_provider(controller: Controller) -> None:
    from ndif.common import providers

    module = types.ModuleType("ndif.common.providers.ray")

    class CachedActorError(Exception):
        pass

    class RayProvider:
        connected = classmethod(lambda cls: True)
        reset = classmethod(lambda cls: None)
        connect = classmethod(lambda cls: None)
        is_connection_error = classmethod(lambda cls, error: False)

    module.NAMESPACE = "NDIF"
    module.CachedActorError, module.RayProvider = CachedActorError, RayProvider
    module.controller_handle = lambda: _Handle(controller)
    module.get_model_actor_handle = lambda model_key, replica_id: _Handle(controller.actor(model_key, replica_id))
    sys.modules["ndif.common.providers.ray"] = module
    providers.ray = module


def _stub_auth(key: str | None) -> None:
    from ndif.common.providers.postgres import PostgresProvider

    async def fetch(query, key_id, *rest):
        if key is not None and str(key_id) == key:
            return [{"user_id": "00000000-0000-0000-0000-000000000001", "email": "test@localhost", "user_tag": None}]
        return []

    PostgresProvider.enabled = classmethod(lambda cls: key is not None)
    PostgresProvider.fetch = staticmethod(fetch)


def _stub_gpu() -> None:
    import torch
    from ndif.services.ray.deployments.modeling import base
    from nnsight.modeling.huggingface import HuggingFaceModel

    torch.cuda.synchronize = lambda *args, **kwargs: None

    def init(self, model_key, execution_timeout=None, gpu_mem_bytes_by_id=None, dtype="bfloat16", **kwargs):
        self.model_key, self.execution_timeout = model_key, execution_timeout
        self.gpu_mem_bytes_by_id = gpu_mem_bytes_by_id or {}
        self.dtype_name = dtype
        self.dtype = base.resolve_dtype(dtype)
        self.kwargs, self.cached = kwargs, False
        self.kill_switch, self.kill_reason, self.execution_ident = asyncio.Event(), None, None
        self.runtime_context = None
        self.model = self.load_from_disk()

    def load_from_disk(self):
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True, dtype=self.dtype, **self.kwargs)
        model._module.requires_grad_(False)
        return model

    base.BaseModelDeployment.__init__ = init
    base.BaseModelDeployment.load_from_disk = load_from_disk


_PLAIN = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class _Fields(logging.Formatter):
    """A log line with the structured fields NDIF's ``event`` attaches (what its Loki sink ships)."""

    def format(self, record):
        fields = {k: v for k, v in vars(record).items() if k not in _PLAIN}
        return f"{record.name} {record.levelname} {record.getMessage()} {fields}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


class Cluster:
    """redis, NDIF's API and its queue + model actor, each its own process, on loopback ports."""

    def __init__(self, models: dict[str, str], *, hf_home, key: str | None, workdir):
        self.models, self.hf_home, self.key = models, str(hf_home), key
        self.workdir = Path(workdir)
        self.procs: dict[str, subprocess.Popen] = {}
        self.redis_port = self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def logs(self) -> list[Path]:
        return sorted(self.workdir.glob("*.log"))

    def _spawn(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        with open(self.workdir / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                                cwd=Path(__file__).resolve().parent.parent)

    def start(self) -> Cluster:
        import shutil

        self.workdir.mkdir(parents=True, exist_ok=True)
        redis = shutil.which("redis-server")
        if redis is None:
            raise FileNotFoundError("redis-server is not installed")
        self.redis_port, self.port = self.redis_port or free_port(), self.port or free_port()
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        self._spawn("redis", [redis, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(data)])
        _wait_port(self.redis_port, self.procs["redis"], "redis-server")
        env = {**os.environ, "HF_HOME": self.hf_home, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        env.pop("TEST_NDIF_SERVER_KEY", None)
        if self.key is not None:
            env["TEST_NDIF_SERVER_KEY"] = self.key  # not on a command line, where ps shows it
        me, redis_url = [sys.executable, str(Path(__file__).resolve())], f"redis://127.0.0.1:{self.redis_port}"
        self._spawn("queue", me + ["queue", "--redis", redis_url, "--models", json.dumps(self.models)], env)
        self._spawn("api", me + ["api", "--port", str(self.port), "--redis", redis_url], env)
        _wait_port(self.port, self.procs["api"], "the NDIF API")
        _wait_connected(redis_url, self.procs["queue"])
        return self

    def kill(self, *names: str) -> None:
        """SIGKILL the named processes (all, by default) and reap them."""
        for name in names or list(self.procs):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.kill()
                proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f} s")


def _wait_connected(redis_url: str, proc, timeout: float = 90) -> None:
    """Until the queue has connected (it sets ``ray:connected``; the API answers 503 before)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the NDIF queue exited with {proc.returncode}")
        if client.get("ray:connected"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the NDIF queue did not connect within {timeout:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=("api", "queue"))
    p.add_argument("--port", type=int, default=0, help="the API's port (role api)")
    p.add_argument("--redis", required=True)
    p.add_argument("--models", default="{}", help='JSON {"hub/id": "float32"} (role queue)')
    args = p.parse_args()
    os.environ["NDIF_REDIS_URL"] = args.redis
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Fields())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if args.role == "api":  # gunicorn's worker: the FastAPI app alone
        import uvicorn

        _stub_auth(os.environ.get("TEST_NDIF_SERVER_KEY"))
        from ndif.services.api.app import app

        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="info")
        return
    import torch  # the queue's process (gunicorn spawns it beside the workers), model actor in it

    torch.set_num_threads(1)
    _stub_ray()
    controller = Controller(json.loads(args.models))
    _stub_ray_provider(controller)
    _stub_gpu()
    from ndif.services.api.queue.dispatcher import Dispatcher

    Dispatcher.start()  # connects to redis and (the stand-in) Ray, sets ray:connected, serves forever


if __name__ == "__main__":
    main()
