"""Start vaelab's console scripts without paying torch's import each time: a zygote (as Android and Chromium call it).

Every vaelab command imports torch, Hydra and, to train, Lightning (torchvision and torch._dynamo come with it):
about 5.5 s of CPU before the first line of the command runs, and the suite runs its commands by the hundred on two
cores. The zygote is one interpreter per pytest worker that has done those imports once; for each command it forks,
and the fork becomes the command: the console script's own entry point, with the test's arguments, environment,
working directory, standard streams (stdin /dev/null, stdout and stderr to files the test reads), signal dispositions
and exit status (a negative one when a signal ended it), exactly as `subprocess.run` would give them. Python's
`random` reseeds itself in a fork; vaelab seeds torch itself.

What a fork cannot give is a fresh interpreter: what happens at start-up or import (PYTHONPATH, OMP_*, import-time
warnings, which modules a command imports, how long imports take) belongs to a real process. So `run` says when a
request needs one (`needs_a_real_process`), and the tests about start-up, imports, signals sent to a running
command and the installed scripts start real processes themselves. VAELAB_TESTS_REAL_PROCESSES=1 sends every
command to a real process (the same suite, slower), to check that the two agree.

    python tests/zygote.py SOCKET     # the server; tests use run() below, through tests/conftest.py's run_cli
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Environment variables that vaelab and its libraries read while a command runs, not at import: a request may set
# them and still be served by a fork. Any other difference from the zygote's own environment needs a real process.
READ_AT_RUN_TIME = ("VAELAB_", "WANDB_", "MLFLOW_", "HOME", "TMPDIR", "CI", "TERM", "COLUMNS", "LINES", "NO_COLOR")
REQUEST_LIMIT = 1 << 20


def needs_a_real_process(env: dict[str, str], base: dict[str, str]) -> bool:
    changed = {key for key in env.keys() | base.keys() if env.get(key) != base.get(key)}
    return any(not key.startswith(READ_AT_RUN_TIME) for key in changed)


# --- the server ----------------------------------------------------------------------------------------------------


def preload() -> dict:
    """Import the heavy, side-effect-free part of what the commands import (torch, torchvision with the
    torch._dynamo it pulls in, torchmetrics, TensorBoard, Hydra), and find each console script's entry point.
    Not Lightning: pytorch_lightning and lightning_fabric give themselves a stderr handler when they are imported
    before logging is configured (as Hydra does in a command), so they are imported by the command, as in a fresh
    process, and neither is any vaelab module that imports them."""
    from importlib.metadata import entry_points

    import hydra.utils  # noqa: F401
    import tensorboard.summary  # noqa: F401
    import torch  # noqa: F401
    import torchmetrics  # noqa: F401
    import torchvision  # noqa: F401

    import vaelab.commands.cli  # noqa: F401

    assert "pytorch_lightning" not in sys.modules and "lightning_fabric" not in sys.modules, "see preload's docstring"
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("vaelab")}
    return {name: ep.load() for name, ep in scripts.items()}


def serve(path: str) -> tuple | None:
    """Answer requests until the client goes away. Returns only in a forked command: (entry point, request)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: end with the pytest worker
    entries = preload()
    sys.stdout.flush()
    sys.stderr.flush()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(8)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the monitors are reaped by the kernel
    while True:
        connection, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(connection, REQUEST_LIMIT, 3)
        request = json.loads(message)
        if request.get("stop"):
            return None
        if os.fork() == 0:  # the monitor: starts the command, waits for it, says how it ended
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            command = os.fork()
            if command == 0:
                connection.close()
                for fd, target in zip(fds, (0, 1, 2)):
                    os.dup2(fd, target)
                    os.close(fd)
                return entries[request["tool"]], request
            for fd in fds:
                os.close(fd)
            connection.send(f"{command}".encode())
            _, status = os.waitpid(command, 0)
            connection.send(f"{os.waitstatus_to_exitcode(status)}".encode())
            os._exit(0)
        for fd in fds:
            os.close(fd)
        connection.close()


def become(entry, request: dict) -> None:
    """Turn this fork into the command: what a fresh `subprocess.run([script, *args])` would be given."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python sets it at start-up (not ignored, not default)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # found again from TMPDIR, as a fresh process would (the preload's imports set it)
    os.chdir(request["cwd"])
    if request["env"].get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(write_through=True)
        sys.stderr.reconfigure(write_through=True)
    sys.argv = [request["script"], *request["args"]]
    try:
        code = entry()
    except SystemExit as ended:
        code = ended.code
    except BaseException as error:
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1
    leave(code)


def leave(code) -> None:
    """End as the console script would (threads joined, atexit handlers run, streams flushed, SystemExit's code), but
    without the interpreter's teardown: tearing down the preloaded torch and its modules costs seconds a command."""
    import atexit

    threading._shutdown()
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code == -signal.SIGINT:  # as Python ends on an uncaught KeyboardInterrupt: killed by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit((code or 0) & 0xFF)


# --- the client ----------------------------------------------------------------------------------------------------

_zygote: dict = {}
_lock = threading.Lock()


def _server(env: dict[str, str]) -> str:
    """This pytest worker's zygote (started on first use, with the environment the commands will mostly get)."""
    with _lock:
        if not _zygote or _zygote["process"].poll() is not None:
            _remove_folder()  # of a zygote that has ended
            folder = tempfile.mkdtemp(prefix="vaelab-zygote-")
            path = os.path.join(folder, "socket")
            process = subprocess.Popen(
                [sys.executable, __file__, path], env=env, stdin=subprocess.DEVNULL, cwd=folder, start_new_session=True
            )
            deadline = 120
            while not os.path.exists(path):
                try:
                    process.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    deadline -= 0.05
                    if deadline > 0:
                        continue
                raise RuntimeError(f"the test zygote did not start (exit {process.returncode})")
            _zygote.update(process=process, path=path)
        return _zygote["path"]


def serves(tool: str, env: dict[str, str], base: dict[str, str]) -> bool:
    """Whether a fork of the zygote (started with `base`) can stand in for a fresh `tool` given `env`: only vaelab's
    console scripts (`python -c ...` is a fresh interpreter by definition)."""
    return (
        tool.startswith("vaelab-") and not os.environ.get("VAELAB_TESTS_REAL_PROCESSES") and not needs_a_real_process(env, base)
    )


def run(
    script: Path, args: list[str], env: dict[str, str], cwd: Path, timeout: float, base: dict[str, str]
) -> subprocess.CompletedProcess:
    """`subprocess.run([script, *args], capture_output=True, text=True, stdin=DEVNULL, env=env, cwd=cwd, ...)`,
    served by a fork of this worker's zygote (started with the environment `base`; ask `serves` first)."""
    path = _server(base)
    request = {"tool": script.name, "script": str(script), "args": list(args), "env": env, "cwd": str(cwd)}
    with open(os.devnull) as stdin, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
            connection.connect(path)
            socket.send_fds(connection, [json.dumps(request).encode()], [stdin.fileno(), out.fileno(), err.fileno()])
            pid = int(connection.recv(64))
            connection.settimeout(timeout)
            try:
                returncode = int(connection.recv(64))
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired([str(script), *args], timeout) from None
        return subprocess.CompletedProcess([str(script), *args], returncode, _text(out), _text(err))


def _text(file) -> str:
    """What text=True gives: UTF-8, universal newlines."""
    file.seek(0)
    return file.read().decode().replace("\r\n", "\n").replace("\r", "\n")


def stop() -> None:
    if _zygote and _zygote["process"].poll() is None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
            connection.connect(_zygote["path"])
            connection.send(json.dumps({"stop": True}).encode())
        _zygote["process"].wait(timeout=30)
    _remove_folder()


def _remove_folder() -> None:
    """The folder this client made for its zygote's socket (nothing else is in it)."""
    path = _zygote.pop("path", None)
    if path:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


if __name__ == "__main__":
    command = serve(sys.argv[1])
    if command is not None:
        become(*command)
