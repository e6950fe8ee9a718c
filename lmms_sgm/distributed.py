"""Profiling over several processes with torch.distributed: a thin layer over the batch loop.

Launched by ``torchrun --nproc-per-node N --no-python lmms-sgm profile ...`` or
``accelerate launch --num_processes N ...``: the launcher's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) says how many processes there are;
:func:`from_env` joins them (``env://``; gloo on CPU, nccl on CUDA, one GPU per process:
``cuda:LOCAL_RANK``).

The batches (one token length each, :func:`lmms_sgm.profiling.length_batches`) are the same list
in every process and in a single-process run. They are handed out in rounds: in round j process
r traces the batch ``todo[j * N + r]``, then process 0 receives the round's pooled responses
(point-to-point, one tensor per batch) and stores them at their examples' indices. So every
example's responses are computed exactly as in one process (same batch, same rows: the same
bits), process 0 computes the AUROC once, and the glasses are the single-process glasses. A
round waits for its slowest batch only, and process 0 holds no more than one round in flight.

Failures: before each exchange the processes agree on whether all of them succeeded (one small
all-gather); a Python error on any process then stops all of them with a non-zero exit, the
message printed once, by process 0. A process that dies outright (killed, out of memory) is
seen by the launcher, which stops the others (torchrun, accelerate); the process group's
timeout (``LMMS_SGM_DIST_TIMEOUT_S``, default 1800 s) bounds any other wait.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterable, Iterator

import torch

TIMEOUT_ENV = "LMMS_SGM_DIST_TIMEOUT_S"


class PeerFailed(RuntimeError):
    """Another process failed; this one stops too. Process 0's message names the failure."""


class Group:
    """One process: the rounds are the batches themselves, nothing is exchanged."""

    rank = 0
    world_size = 1
    local_rank = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        return requested

    def broadcast(self, obj):
        return obj

    @contextlib.contextmanager
    def together(self):
        """A step every process takes; an error in any of them stops all of them (here: just the step)."""
        yield

    def rounds(self, todo: Iterable[int], compute: Callable[[int], torch.Tensor],
               shape: Callable[[int], tuple]) -> Iterator[tuple[int, torch.Tensor]]:
        """``(batch index, its [rows, width] float32 responses)`` for every batch in ``todo``;
        on process 0 all of them, elsewhere none (each process computes its share)."""
        for i in todo:
            yield i, compute(i)

    def close(self) -> None:
        pass

    def __repr__(self):
        return f"<{type(self).__name__} rank {self.rank} of {self.world_size}>"


class TorchGroup(Group):
    """The processes of a ``torchrun`` / ``accelerate launch`` run, joined through torch.distributed."""

    def __init__(self, backend: str | None = None):
        import torch.distributed as dist

        self.dist = dist
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.owned = not dist.is_initialized()
        if self.owned:
            backend = backend or ("nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        self.backend = dist.get_backend()
        self.comm = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def device(self, requested: str) -> str:
        """One GPU per process: ``cuda`` means this process's own, ``cuda:LOCAL_RANK``."""
        if requested == "cuda":
            return f"cuda:{self.local_rank}"
        if requested.startswith("cuda:") or requested == "auto":
            raise ValueError(f"device={requested} under {self.world_size} processes: each process takes its own GPU, "
                             "give device=cuda (it becomes cuda:LOCAL_RANK); to spread one model over several GPUs, "
                             "run one process with device=auto instead")
        return requested

    def broadcast(self, obj):
        box = [obj if self.is_main else None]
        self.dist.broadcast_object_list(box, src=0, device=self.comm)
        return box[0]

    def agree(self, error: BaseException | None) -> None:
        """Every process reports whether its step failed; if any did, every process raises:
        process 0 its own error, or :class:`PeerFailed` naming the first process that failed and
        its message; the others :class:`PeerFailed` (which the CLI does not print: one message)."""
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self.comm)
        flags = [torch.zeros_like(flag) for _ in range(self.world_size)]
        self.dist.all_gather(flags, flag)
        failed = [r for r, f in enumerate(flags) if int(f.item())]
        if not failed:
            return
        messages: list = [None] * self.world_size
        mine = None if error is None else " ".join(f"{type(error).__name__}: {error}".split())
        self.dist.all_gather_object(messages, mine)
        if self.is_main and error is not None:
            raise error
        raise PeerFailed(f"process {failed[0]} of {self.world_size} failed: {messages[failed[0]]}") from error

    @contextlib.contextmanager
    def together(self):
        try:
            yield
        except Exception as e:  # every process learns of it, then it is re-raised
            self.agree(e)
            raise
        self.agree(None)

    def rounds(self, todo, compute, shape):
        todo = list(todo)
        n = self.world_size
        for start in range(0, len(todo), n):
            chunk = todo[start:start + n]
            mine = chunk[self.rank] if self.rank < len(chunk) else None
            result, error = None, None
            if mine is not None:
                try:
                    result = compute(mine)
                except Exception as e:  # noqa: BLE001 -- reported to every process by agree()
                    error = e
            self.agree(error)
            if self.is_main:
                for r, i in enumerate(chunk):
                    if r == 0:
                        yield i, result
                    else:
                        buffer = torch.empty(shape(i), dtype=torch.float32, device=self.comm)
                        self.dist.recv(buffer, src=r)
                        yield i, buffer.cpu()
            elif mine is not None:
                self.dist.send(result.to(self.comm, torch.float32).contiguous(), dst=0)

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


def from_env(backend: str | None = None) -> Group:
    """The processes this one was launched with: a :class:`TorchGroup` under torchrun / accelerate
    (``WORLD_SIZE`` > 1), else a single-process :class:`Group`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return TorchGroup(backend)
    return Group()
