"""Running :mod:`fedloop.flower` on Flower's supported path: a private SuperLink in simulation
mode, the app written to a temporary folder, and ``flwr run`` (:func:`run_flower`); and
:func:`free_ports` for deployments. ``fedloop.flower`` re-exports both.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedloop.checkpoint import check_run_folder, load_checkpoint
from fedloop.config import RunConfig

if TYPE_CHECKING:  # fedloop.flower imports this module at its end
    from fedloop.flower import FlowerSettings

__all__ = ["run_flower", "free_ports"]


def _write_app(folder: Path, config: RunConfig, settings: FlowerSettings) -> Path:
    """A Flower app (``flwr run`` builds it into a FAB) whose ServerApp and ClientApp are this
    module's, with the whole run in its ``[tool.flwr.app.config]``."""
    import tomli_w

    from fedloop import flower

    folder.mkdir(parents=True)
    (folder / "fedloop_sim_app").mkdir()
    (folder / "fedloop_sim_app" / "__init__.py").write_text(
        '"""fedloop.flower\'s ServerApp and ClientApp, for fedloop.flower.run_flower."""\n'
        "from fedloop.flower import client_app, server_app\n\n__all__ = [\"client_app\", \"server_app\"]\n")
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedloop-simulation", "version": "1.0.0", "license": "MIT", "dependencies": []},
        "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["fedloop_sim_app"]}}}},
                 "flwr": {"app": {"publisher": "fedloop",
                                  "components": {"serverapp": "fedloop_sim_app:server_app",
                                                 "clientapp": "fedloop_sim_app:client_app"},
                                  "config": flower.run_config_of(config, settings)}}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound together, then released) for a local
    SuperLink, its nodes or a private simulation."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


#: ``backend_config`` keys :func:`run_flower` passes to the simulation (``options.backend.*``).
_BACKEND_KEYS = {"client_resources": ("num_cpus", "num_gpus"),
                 "init_args": ("num_cpus", "num_gpus", "logging_level", "log_to_driver")}


def _backend_options(backend_config: Mapping | None) -> dict:
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}} if backend_config is None else backend_config
    out: dict[str, dict] = {}
    for section, values in backend.items():
        if section not in _BACKEND_KEYS or not isinstance(values, Mapping) \
                or not set(values) <= set(_BACKEND_KEYS[section]):
            raise ValueError(f"backend_config takes {_BACKEND_KEYS}; got {section!r}: {values!r:.80}")
        out[section.replace("_", "-")] = {k.replace("_", "-"): v for k, v in values.items()}
    return out


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_flower(config: RunConfig, *, num_supernodes: int | None = None, settings: FlowerSettings | None = None,
               backend_config: dict | None = None, log_file=None, timeout: float = 3600.0):
    """Run ``config`` as a Flower simulation with one virtual SuperNode per client; returns the
    :class:`~fedloop.History` (also saved to ``config.out``, with the checkpoint).

    Flower 1.42's supported simulation path (``flwr.simulation.run_simulation`` is deprecated):
    a private ``flower-superlink --simulation`` on free local ports, and ``flwr run`` of an app
    whose ServerApp and ClientApp are this module's and whose run config is ``config`` and
    ``settings`` (:func:`run_config_of`). The SuperLink runs the ServerApp and the ClientApps
    (Ray backend) in its own processes; it is stopped when the run ends. ``backend_config``:
    ``{"client_resources": {"num_cpus", "num_gpus"}, "init_args": {"num_cpus", "num_gpus",
    "logging_level", "log_to_driver"}}`` (default one CPU per virtual node). ``log_file``
    receives the run's log (``flwr run --stream``)."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    import httpx
    import tomli_w

    from fedloop import flower
    from fedloop.history import History

    settings = settings or flower.FlowerSettings()
    out = Path(config.out).resolve()
    config = RunConfig.from_dict({**config.to_dict(), "out": str(out)})  # the ServerApp runs elsewhere
    if settings.resume:  # fail here, before any process starts
        load_checkpoint(check_run_folder(out))
    nodes = int(num_supernodes or config.clients)
    binary = Path(sys.executable).parent

    def tool(name):
        path = binary / name
        if path.exists():
            return str(path)
        found = shutil.which(name)
        if found is None:
            raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH (pip install flwr)")
        return found

    with tempfile.TemporaryDirectory(prefix="fedloop-flower-") as tmp:
        tmp = Path(tmp)
        app = _write_app(tmp / "app", config, settings)
        home = tmp / "flwr-home"
        home.mkdir()
        port, control = free_ports(2)
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
            "default": "fedloop", "fedloop": {"address": f"127.0.0.1:{port}", "insecure": True, "options": {
                "num-supernodes": nodes, "backend": _backend_options(backend_config)}}}}))
        env = dict(os.environ, FLWR_HOME=str(home), PYTHONUNBUFFERED="1",
                   PATH=f"{binary}{os.pathsep}{os.environ.get('PATH', '')}")
        link_log = tmp / "superlink.log"
        run_log = Path(log_file) if log_file is not None else tmp / "flwr-run.log"
        with open(link_log, "w") as fh:
            link = subprocess.Popen([tool("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
                                     "--port", str(port), "--control-api-address", f"127.0.0.1:{control}",
                                     "--disable-runtime-dependency-installation"],
                                    stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                if link.poll() is not None:
                    raise RuntimeError(f"flower-superlink --simulation exited with code {link.returncode}:\n"
                                       f"{_tail(link_log)}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"flower-superlink --simulation did not start within 120 s:\n{_tail(link_log)}")
                time.sleep(0.2)
            with open(run_log, "w") as fh:
                try:
                    code = subprocess.run([tool("flwr"), "run", str(app), "fedloop", "--stream"], stdout=fh,
                                          stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
                except subprocess.TimeoutExpired:
                    raise RuntimeError(f"the Flower simulation did not finish within {timeout:g} s:\n"
                                       f"{_tail(run_log)}") from None
        finally:
            if link.poll() is None:  # its SuperExec and simulation process end with it
                os.killpg(link.pid, signal.SIGTERM)
                try:
                    link.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(link.pid, signal.SIGKILL)
                    link.wait(timeout=15)
        history = History.load(out) if (out / "history.json").is_file() else None
        if code != 0 or history is None or len(history.rounds) < config.rounds:
            done = 0 if history is None else len(history.rounds)
            raise RuntimeError(f"the Flower simulation ended (flwr run exit code {code}) after {done} of "
                               f"{config.rounds} rounds (see the log):\n{_tail(run_log)}\n{_tail(link_log, 2000)}")
    return history
