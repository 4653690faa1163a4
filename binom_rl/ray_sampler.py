"""The sampler's workers as Ray actors: ``MultiTaskSampler(..., backend="ray")``.

Imported only for that backend (Ray is the optional extra ``pip install -e ".[ray]"``).
Each actor holds a :class:`~binom_rl.sampler._WorkerCore`, the same object a worker
process serves, for its contiguous slice of the T x B envs, and answers the same
commands; by default a sample call is one ``rollout`` per actor, the actor running the
policy for its own envs (docs/distributed.md has the measurements behind that choice).

Connecting (:func:`connect`): ``address`` None means ``RAY_ADDRESS`` if set, else
``"local"``: a new Ray instance on this machine with its cores (``address="local"``, so
that neither a running cluster nor a stale ``ray_current_cluster`` file, which a head not
stopped with ``ray stop`` leaves behind, changes what happens); ``"auto"`` or
``"host:port"`` joins a running cluster. A process that is already connected
(``ray.init`` called by the user) keeps its connection, whatever ``address`` says.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import IO, Any

import ray
import torch
from gymnasium.envs.registration import EnvSpec
from ray.exceptions import RayActorError, RayError, RayTaskError

from binom_rl.runtime import available_cores
from binom_rl.sampler import _WorkerCore

#: How long a cluster address may take to accept a TCP connection. ray.init itself
#: retries an address that does not answer for minutes (measured: over 2 minutes, Ray
#: 2.60.0), so the sampler checks first.
REACH_TIMEOUT_S = 5.0
#: How long the actors may take to start (a worker process each, binom_rl imported).
START_TIMEOUT_S = 120.0
#: Wake-up interval while waiting for actors: Ctrl-C is handled at least this often.
POLL_S = 0.5

_state = {"users": 0, "owned": False}  # samplers using the connection; whether we made it


def connect(address: str | None, num_workers: int) -> None:
    """Connect this process to Ray for a sampler with ``num_workers`` actors.

    Raises ValueError (before any actor starts) for an address that cannot be reached
    and for a cluster with fewer CPUs than actors (they would wait forever).
    """
    if not ray.is_initialized():
        with _keeping_sigterm_handler():
            address = address or os.environ.get("RAY_ADDRESS") or "local"
            if address == "local":
                ray.init(
                    address="local",
                    num_cpus=max(available_cores(), num_workers),
                    include_dashboard=False,
                    logging_level="WARNING",
                )
            else:
                _check_reachable(address)
                with tempfile.TemporaryFile("w+") as log:
                    try:
                        with _stderr_into(log):
                            ray.init(address=address, logging_level="WARNING")
                    except (ConnectionError, RayError) as exc:
                        raise ValueError(_join_error(address, exc)) from exc
                    log.seek(0)
                    sys.stderr.write(log.read())  # joined: Ray's messages as usual
        _state["owned"] = True
    _state["users"] += 1
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < num_workers:
            raise ValueError(
                f"num_workers {num_workers} Ray actors need {num_workers} CPUs, the Ray "
                f"cluster has {cpus:g}: lower --num-workers or add nodes"
            )
    except BaseException:
        disconnect()
        raise


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """SIGTERM's handler as it was before, after the block: ray.init sets its own (exit at
    once with code 15, and its C++ core logs a stack), which would skip the command's
    unwinding on SIGTERM (binom_rl.agents.cli.common: workers closed, Ray shut down)."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def _stderr_into(file: IO[str]) -> Iterator[None]:
    """File descriptor 2 into ``file`` meanwhile. A cluster that refuses this process (no
    token, see :func:`_join_error`) makes Ray's C++ client log a line a second to fd 2
    while ray.init retries (about 20 lines), which would bury the one error line."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def disconnect() -> None:
    """Undo one :func:`connect`; the last one out shuts down a connection it made (a Ray
    instance started here stops with it; a joined cluster keeps running)."""
    _state["users"] = max(_state["users"] - 1, 0)
    if _state["users"] == 0 and _state["owned"]:
        _state["owned"] = False
        release_idle_actors()
        ray.shutdown()


def put(obj: Any) -> ray.ObjectRef:
    """``obj`` in Ray's object store: sent to every actor without pickling it per actor."""
    return ray.put(obj)


class _SamplerActor:
    """A _WorkerCore in a Ray worker process (the remote class is :data:`_RemoteActor`)."""

    def __init__(self):
        torch.set_num_threads(1)
        # one actor per CPU: MuJoCo's rollout pool (envs/mujoco_batch.py) gets one thread
        os.environ.setdefault("BINOM_RL_ROLLOUT_THREADS", "1")
        self.core: _WorkerCore | None = None

    def configure(self, sys_path: list[str], payload: bytes) -> int:
        """Serve the env of ``payload`` (a pickled env spec and kwargs); returns the pid.

        The driver's import path goes first, where it exists here: a user's env module
        found through the driver's sys.path is then found here too (on a cluster: where
        the nodes share that folder). The spec is unpickled only after that.
        """
        sys.path[:0] = [p for p in sys_path if p not in sys.path and os.path.isdir(p)]
        self.release()
        self.core = _WorkerCore(*pickle.loads(payload))
        return os.getpid()

    def call(self, cmd: str, *args: Any) -> Any:
        """``core.<cmd>(*args)``; whatever it returns goes back unchanged."""
        return getattr(self.core, cmd)(*args)

    def release(self) -> None:
        """Close the envs; the actor waits, idle, for its next sampler."""
        if self.core is not None:
            self.core.close()
            self.core = None


# max_restarts=0: a dead actor lost its envs' state mid-episode, so its death must surface
# as an error, not as a fresh actor answering the next command.
_RemoteActor = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(_SamplerActor)

#: Keep the actors of closed samplers for the next sampler of this process instead of
#: ending them (an actor is a worker process that imports torch: seconds to start). Off by
#: default, because each idle actor keeps its CPU reserved, which would leave other Ray
#: work of the process waiting, until Ray shuts down or :func:`release_idle_actors`
#: ends them; the tests turn it on.
reuse_actors = False
_idle: dict[str, list] = {"job": None, "actors": []}


class RayWorker:
    """One actor behind the sampler's worker interface (send a command, receive its result)."""

    def __init__(self, index: int, actor: Any):
        self.index, self.actor = index, actor
        self.pid: int | None = None  # the actor's process, once configured
        self._pending: ray.ObjectRef | None = None

    def send(self, cmd: str, *args: Any) -> None:
        self._pending = self.actor.call.remote(cmd, *args)

    def recv(self) -> Any:
        return self.gather([self])[0]

    @staticmethod
    def gather(workers: Sequence[RayWorker]) -> list[Any]:
        """Every worker's result, taken as it arrives, so that an actor that died or raised
        is reported at once; wakes up every POLL_S for Ctrl-C. On an error the workers keep
        their pending calls, which tells :meth:`close` not to reuse them."""
        refs = {w._pending: i for i, w in enumerate(workers)}
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            for ref in ready:
                results[refs[ref]] = workers[refs[ref]]._get(ref)
        for w in workers:
            w._pending = None
        return [results[i] for i in range(len(workers))]

    def _get(self, ref: ray.ObjectRef) -> Any:
        try:
            return ray.get(ref)
        except RayTaskError as exc:  # the env or act_fn raised inside the actor
            raise RuntimeError(f"sampler worker {self.index} raised:\n{exc}") from None
        except RayError as exc:  # the actor died (or Ray killed it, e.g. out of memory)
            raise RuntimeError(_failure_message(self.index, exc)) from None

    def close(self) -> None:
        """Ended; or, with :data:`reuse_actors`, kept idle if it answered its last call
        (otherwise it may be dead, or busy with a call nobody waits for)."""
        if reuse_actors and self._pending is None and self.pid is not None:
            self.actor.release.remote()
            _idle["actors"].append(self.actor)
        else:
            ray.kill(self.actor, no_restart=True)


def start_workers(
    num_workers: int, env_spec: EnvSpec, env_kwargs: dict[str, Any]
) -> list[RayWorker]:
    """``num_workers`` actors serving ``env_spec``: idle ones first, new ones spread over
    the cluster's nodes; each configured and answering before this returns."""
    job = ray.get_runtime_context().get_job_id()
    if _idle["job"] != job:  # handles from an earlier Ray session are dead
        _idle["job"], _idle["actors"] = job, []
    reused = [_idle["actors"].pop() for _ in range(min(num_workers, len(_idle["actors"])))]
    new = [
        _RemoteActor.options(scheduling_strategy="SPREAD").remote()
        for _ in range(num_workers - len(reused))
    ]
    workers = [RayWorker(i, actor) for i, actor in enumerate(reused + new)]
    payload = pickle.dumps((env_spec, env_kwargs))
    try:
        for w in workers:
            w._pending = w.actor.configure.remote(list(sys.path), payload)
        refs = [w._pending for w in workers]
        started, _ = ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_S)
        if len(started) < len(refs):
            raise RuntimeError(
                f"{len(refs) - len(started)} of {num_workers} Ray actors did not start within "
                f"{START_TIMEOUT_S:.0f} s (cluster resources available: "
                f"{ray.available_resources()})"
            )
        for w, ref in zip(workers, refs, strict=True):
            try:
                w.pid = ray.get(ref)
            except RayTaskError as exc:  # most likely the env's module is missing there
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                raise ValueError(
                    f"a Ray actor cannot load env {env_spec.id}: {type(cause).__name__}: "
                    f"{cause} (on a cluster the env's module must be importable on every "
                    "node)"
                ) from None
            except RayError as exc:
                raise RuntimeError(_failure_message(w.index, exc)) from None
            w._pending = None
    except BaseException:
        for w in workers:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - the actor may be gone already
                pass
        raise
    return workers


def release_idle_actors() -> None:
    """End the actors that closed samplers left for reuse (frees their CPUs)."""
    actors, _idle["actors"] = _idle["actors"], []
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - Ray may be shut down already
            pass


def _failure_message(index: int, exc: RayError) -> str:
    """One line: which worker, what Ray said first, what the run can do about it."""
    first = str(exc).strip().splitlines()
    detail = f" ({type(exc).__name__}: {first[0]})" if first else f" ({type(exc).__name__})"
    what = "died" if isinstance(exc, RayActorError) else "failed"
    return (
        f"sampler worker {index} (a Ray actor) {what}{detail}; its node may have gone away or "
        "run short of memory (Ray's memory monitor ends workers when a node passes 95% "
        "use, whoever uses it). The last checkpoint is intact: --resume continues the run"
    )


def _check_reachable(address: str) -> None:
    """ValueError unless ``address`` (host:port, or the one "auto" finds) accepts a TCP
    connection within REACH_TIMEOUT_S."""
    target = _auto_address() if address == "auto" else address
    if target is None or target.startswith("ray://"):  # unknown, or Ray Client: Ray's errors
        return
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"ray-address must be 'auto', 'host:port' or 'local', got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        found = f" (found by 'auto': {target})" if address == "auto" else ""
        raise ValueError(
            f"cannot reach the Ray cluster at {address}{found}: {exc.strerror or exc}; is "
            "`ray start --head` running there? (a head stopped without `ray stop` leaves "
            "its address behind for 'auto')"
        ) from exc


def _auto_address() -> str | None:
    """The address ``ray.init(address="auto")`` would join: RAY_ADDRESS, else the cluster
    Ray recorded on this machine (``ray_current_cluster``, or a running GCS process).
    ValueError if there is none; None if Ray's resolver, which is not public API, moved."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return None
    try:
        return canonicalize_bootstrap_address("auto")
    except ConnectionError as exc:
        raise ValueError(
            "--ray-address auto: no running Ray cluster found on this machine (start one "
            "with `ray start --head`, or give its host:port)"
        ) from exc


def _join_error(address: str, exc: BaseException) -> str:
    first = str(exc).splitlines() or [type(exc).__name__]
    message = f"cannot join the Ray cluster at {address}: {first[0]}"
    if os.environ.get("RAY_AUTH_MODE") is None and address != "auto":
        # Ray enables token authentication by default, and sends its token only to a
        # cluster found by "auto", never to an explicit address.
        message += (
            "; a cluster with token authentication (Ray's default) joined by host:port "
            "needs RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN or "
            "~/.ray/auth_token), or use --ray-address auto on one of its nodes"
        )
    return message
