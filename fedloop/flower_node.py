"""A Flower 1.42 SuperNode whose ClientApp runs in one long-lived process.

Stock ``flower-supernode`` (``--isolation subprocess``) starts a SuperExec that starts a fresh
``flwr-clientapp`` process **per message**: every message pays Python, torch and ``fedloop``
imports, the FAB install and the task build (``make_task``), and ``flwr-clientapp`` 1.42 handles
exactly one task token and exits, so it cannot be kept alive. Polling adds to that: the
SuperNode's idle loop sleeps a fixed 3 s between pulls from the SuperLink and 0.5 s between
checks for the ClientApp's reply (both hard-coded in ``flwr.supernode.start_client_internal``),
and the SuperExec polls its Runtime API every 1 s (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``).

This module keeps the SuperNode and its Runtime API as they are and replaces the per-message
process:

* :func:`serve` is a **long-lived ClientApp worker**: the SuperExec's loop (``AcquireTask`` on
  the SuperNode's Runtime API), but it runs each acquired ClientApp task in its own process
  instead of launching ``flwr-clientapp``, with ``flwr-clientapp``'s own steps (pull the task
  input, run the ClientApp, push the reply and the task output with the node's ``Context``,
  task heartbeats). The ClientApp is loaded from the run's FAB once per FAB hash, so the
  module-level caches of the ClientApp (``fedloop.flower_client``'s built task) live across messages.
  Pair it with ``flower-supernode --isolation process``, which starts no SuperExec and waits
  for an external one::

      flower-supernode --insecure --superlink SERVER:9093 --isolation process --port 9094 \\
          --node-config "partition-id=0 num-partitions=3"
      python -m fedloop.flower_node worker --runtime-api-address 127.0.0.1:9094

* ``python -m fedloop.flower_node supernode [--poll-interval S] <flower-supernode args>`` runs
  both in one process: the SuperNode (``--isolation process``) and the worker in a thread, and
  with ``--poll-interval`` (default 0.05 s) it shortens the SuperNode's two hard-coded waits
  (3 s idle pull, 0.5 s reply check) to S. That is done by giving
  ``flwr.supernode.start_client_internal`` a ``time`` whose ``sleep`` is capped at S, for Flower
  1.42 only (checked); ``--poll-interval 0`` leaves the SuperNode untouched. Killing the process
  kills the node and its ClientApp together.

Nothing here unpickles: messages travel in Flower's own protobuf/inflatable format.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import types
from logging import ERROR, INFO, WARNING

__all__ = ["serve", "run_task", "patch_supernode_polling", "patch_object_pull_backoff", "main"]

#: Seconds between a running task's heartbeats (Flower expires a claimed task after 30 s without one).
HEARTBEAT_S = 15.0
#: The Flower releases whose SuperNode loop :func:`patch_supernode_polling` was checked against.
PATCHED_FLOWER = ("1.42.",)


def _load_app(run, fab, apps: dict, fixed_app=None):
    """The ClientApp for ``run`` (installed from its FAB and loaded once per FAB hash)."""
    if fixed_app is not None:
        return fixed_app
    if fab.hash_str not in apps:
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn

        install_from_fab(fab.content, skip_prompt=True)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
    return apps[fab.hash_str]


def _pull_task_input(client, backoff: float):
    """``flwr.supernode.runtime.run_clientapp.pull_task_input`` with a short retry for the
    message's objects: the SuperNode creates the task before it has pulled the message's objects
    from the SuperLink, and Flower's own retry waits 1 s, then 2 s, ... for them."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    msgs = client.PullMessages(PullAppMessagesRequest())
    if not msgs.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = msgs.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=backoff, backoff_cap=max(backoff, 1.0))
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


def run_task(runtime_api_address: str, token: str, *, insecure: bool = True, certificates: bytes | None = None,
             apps: dict | None = None, client_app=None, poll_interval: float = 0.05) -> bool:
    """Run one acquired ClientApp task in this process, as ``flwr-clientapp --token`` would
    (without exiting the process). Returns True when the ClientApp completed."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    apps = {} if apps is None else apps
    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)], retry_invoker=retry)
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    done = threading.Event()

    def beat() -> None:
        # A claimed task must beat within 30 s, then every 60 s (Flower's HEARTBEAT_DEFAULT_INTERVAL and
        # PATIENCE); flwr-clientapp beats at once and raises SIGINT on a refused beat, which would end this
        # long-lived process: beat every 15 s from the claim instead, and never signal.
        while not done.wait(HEARTBEAT_S):
            try:
                client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except Exception:  # noqa: BLE001 - the next beat tries again
                pass

    heartbeat = threading.Thread(target=beat, daemon=True, name="fedloop-task-heartbeat")
    message = reply = context = None
    times: list[float] = []
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        times = [time.perf_counter()]
        message, context, run, fab = _pull_task_input(client, poll_interval)
        times.append(time.perf_counter())
        app = _load_app(run, fab, apps, client_app)
        reply = app(message=message, context=context)
        times.append(time.perf_counter())
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # noqa: BLE001 - reported to the server as the node's error reply
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) \
            else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = str(type(ex)) + ":<'" + str(ex) + "'>"
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        details = reason
        if message is not None:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:  # noqa: BLE001
            log(ERROR, "Failed to push the reply message", exc_info=ex)
            status = SubStatus.FAILED
        retry.max_tries = 1
        times.append(time.perf_counter())
        push_task_output(client=client, context=context, sub_status=status, details=details)
        times.append(time.perf_counter())
        done.set()
        client.close()
        if len(times) == 5:  # where a message's time goes on this node (benchmarks/flower.py reads it)
            log(INFO, "fedloop: task took %.3f s (pull %.3f, ClientApp %.3f, push %.3f, task output %.3f)",
                times[4] - times[0], *(b - a for a, b in zip(times, times[1:], strict=False)))
    return status == SubStatus.COMPLETED


def serve(runtime_api_address: str, *, insecure: bool = True, certificates: bytes | None = None,
          poll_interval: float = 0.05, stop: threading.Event | None = None, client_app=None) -> None:
    """The long-lived ClientApp worker (module docstring): acquire ClientApp tasks from the
    SuperNode's Runtime API every ``poll_interval`` seconds and run each in this process, until
    ``stop`` is set. ``client_app`` (a ``flwr.clientapp.ClientApp``) serves every run instead of
    the one in the run's FAB."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore import log
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    if not (isinstance(poll_interval, (int, float)) and 0.001 <= poll_interval <= 60):
        raise ValueError(f"poll_interval must be a number of seconds in [0.001, 60]; got poll_interval = "
                         f"{poll_interval!r}")
    stop = stop or threading.Event()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    apps: dict = {}
    log(INFO, "fedloop ClientApp worker on the Runtime API at %s (poll %g s)", runtime_api_address, poll_interval)
    try:
        while not stop.is_set():
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            except Exception as ex:  # noqa: BLE001 - the SuperNode is starting or restarting: try again
                log(WARNING, "Runtime API at %s not reachable (%s); retrying", runtime_api_address, ex)
                stop.wait(1.0)
                continue
            if res.HasField("task") and res.token:
                run_task(runtime_api_address, res.token, insecure=insecure, certificates=certificates, apps=apps,
                         client_app=client_app, poll_interval=poll_interval)
                continue  # look for the next message at once
            stop.wait(poll_interval)
    finally:
        client.close()


class _CappedTime(types.ModuleType):
    """``time`` with ``sleep`` capped at ``cap`` seconds (everything else is the real module)."""

    def __init__(self, cap: float):
        super().__init__("time")
        self._cap = cap

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(float(seconds), self._cap))


def patch_supernode_polling(poll_interval: float) -> None:
    """Cap the SuperNode's hard-coded waits (3 s between idle pulls, 0.5 s between reply checks)
    at ``poll_interval`` seconds. Checked against Flower 1.42 only: another release raises."""
    import flwr
    import flwr.supernode.start_client_internal as sci

    if not flwr.__version__.startswith(PATCHED_FLOWER):
        raise RuntimeError(f"--poll-interval patches the SuperNode loop of Flower {PATCHED_FLOWER}; this is Flower "
                           f"{flwr.__version__}: use --poll-interval 0 (Flower's own 3 s polling)")
    if not (isinstance(poll_interval, (int, float)) and 0.001 <= poll_interval <= 3):
        raise ValueError(f"poll_interval must be a number of seconds in [0.001, 3]; got poll_interval = "
                         f"{poll_interval!r}")
    if getattr(sci, "time", None) is not time and not isinstance(getattr(sci, "time", None), _CappedTime):
        raise RuntimeError("flwr.supernode.start_client_internal has no module-level `time`: cannot patch it")
    sci.time = _CappedTime(poll_interval)
    patch_object_pull_backoff(sci, poll_interval)


def patch_object_pull_backoff(module, backoff: float) -> None:
    """Make ``module``'s ``pull_objects`` retry an object that is not there yet after ``backoff``
    seconds (doubling, capped at 1 s) instead of Flower's 1 s, 2 s, 4 s ...: a message's objects
    are pushed just after the message itself, so a fast poller often asks a moment too early."""
    import functools

    from flwr.supercore.inflatable import inflatable_utils

    current = getattr(module, "pull_objects", None)
    base = getattr(current, "func", current)
    if base is not inflatable_utils.pull_objects:
        raise RuntimeError(f"{module.__name__} has no module-level `pull_objects` of Flower: cannot patch it")
    module.pull_objects = functools.partial(base, initial_backoff=backoff, backoff_cap=max(backoff, 1.0))


def _runtime_address(args: list[str]) -> tuple[str, str | None]:
    """The Runtime API address the SuperNode serves (its --host/--port) and its CA file."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", default="9094")
    p.add_argument("--ssl-certfile")
    p.add_argument("--ssl-ca-certfile")
    known, _ = p.parse_known_args(args)
    host = "127.0.0.1" if known.host in ("0.0.0.0", "::", "[::]") else known.host
    if known.ssl_certfile and not known.ssl_ca_certfile:
        raise ValueError("a SuperNode with --ssl-certfile needs --ssl-ca-certfile for its in-process ClientApp worker")
    return f"{host}:{known.port}", known.ssl_ca_certfile


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fedloop.flower_node", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="the long-lived ClientApp worker for a `flower-supernode --isolation process`")
    w.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    w.add_argument("--root-certificates", help="CA file of the Runtime API's TLS (default: insecure)")
    w.add_argument("--poll-interval", type=float, default=0.05)
    s = sub.add_parser("supernode", help="flower-supernode (--isolation process) + the worker in one process; "
                                         "other arguments go to flower-supernode")
    s.add_argument("--poll-interval", type=float, default=0.05,
                   help="s between the SuperNode's pulls and the worker's task checks (0: Flower's own waits)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "worker":
        if rest:
            parser.error(f"unknown arguments for worker: {rest}")
        certs = open(args.root_certificates, "rb").read() if args.root_certificates else None
        serve(args.runtime_api_address, insecure=certs is None, certificates=certs, poll_interval=args.poll_interval)
        return
    if "--isolation" in rest or any(a.startswith("--isolation=") for a in rest):
        parser.error("--isolation is set by this command (process: the ClientApp runs in this process)")
    if args.poll_interval < 0:
        parser.error(f"--poll-interval must be >= 0; got --poll-interval {args.poll_interval}")
    address, ca = _runtime_address(rest)
    certs = open(ca, "rb").read() if ca else None
    worker_poll = args.poll_interval or 1.0  # 0: Flower's own SuperExec default
    if args.poll_interval:
        patch_supernode_polling(args.poll_interval)
    thread = threading.Thread(target=serve, args=(address,), daemon=True, name="fedloop-clientapp",
                              kwargs=dict(insecure=certs is None, certificates=certs, poll_interval=worker_poll))
    thread.start()
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest, "--isolation", "process"]
    flower_supernode()


if __name__ == "__main__":
    main()
