"""Start JupyterLab or Voilà on 127.0.0.1 in a private sandbox, and always stop them again.

Each server gets a free port, its own Jupyter config / data / runtime / settings directories (so
nothing from the user's home is read or written) and a server root that is a temporary copy of
``notebooks/``: running the notebooks never touches the committed files. The data the notebooks
read through ``../`` (``data/``, ``bench/``) is linked next to the copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
BIN = Path(sys.executable).parent  # the venv running pytest has jupyter and voila
#: Top-level folders a notebook may read as ``../NAME``; linked next to the temporary copy.
LINKED = ("data", "bench", "seeds")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sandbox(root: Path, notebooks: list[Path]) -> Path:
    """Copy ``notebooks`` into ``root/notebooks`` (plus private Jupyter dirs); return the copy."""
    nb_dir = root / "notebooks"
    nb_dir.mkdir(parents=True)
    for nb in notebooks:
        shutil.copy2(nb, nb_dir / nb.name)
    for name in LINKED:
        if (REPO / name).exists():
            (root / name).symlink_to(REPO / name)
    for sub in ("config", "data", "runtime", "ipython", "lab-workspaces"):
        (root / "jupyter" / sub).mkdir(parents=True)
    # JupyterLab user settings: attach every cell to the DOM (the test reads all of them), no news.
    settings = root / "jupyter" / "lab-settings"
    tracker = settings / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    notif = settings / "@jupyterlab" / "apputils-extension"
    notif.mkdir(parents=True)
    (notif / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    return nb_dir


def sandbox_env(root: Path) -> dict[str, str]:
    j = root / "jupyter"
    env = dict(os.environ)
    env.update(
        JUPYTER_CONFIG_DIR=str(j / "config"),
        JUPYTER_DATA_DIR=str(j / "data"),
        JUPYTER_RUNTIME_DIR=str(j / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(j / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(j / "lab-workspaces"),
        IPYTHONDIR=str(j / "ipython"),
        JUPYTER_PLATFORM_DIRS="1",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
        # The machine has few cores and kernels run side by side: one thread each.
        OMP_NUM_THREADS=os.environ.get("BROWSER_KERNEL_THREADS", "1"),
        MKL_NUM_THREADS=os.environ.get("BROWSER_KERNEL_THREADS", "1"),
    )
    env.pop("MPLBACKEND", None)  # kernels use the inline backend (the test process sets Agg)
    env.pop("JUPYTER_TOKEN", None)
    return env


@dataclass
class Server:
    """A running server; ``stop()`` ends it and every process it started."""

    name: str
    proc: subprocess.Popen
    url: str  # base URL, no trailing slash
    token: str
    log: Path
    root: Path
    children: set[int] = field(default_factory=set)

    def api(self, method: str, path: str, timeout: float = 10.0):
        req = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def remember_children(self) -> None:
        """Note the processes (kernels) started so far, so stop() can end them."""
        with contextlib.suppress(psutil.Error):
            self.children |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # jupyter-server / voila shut their kernels down
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
            if self.proc.poll() is None:
                self.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
        for pid in self.children:  # anything still alive (a stuck kernel) is ended by pid
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                p.kill()
                p.wait(5)


def _wait_ready(server: Server, path: str | None, timeout: float) -> None:
    """Poll ``path`` until it answers 200 (None: until the port accepts connections)."""
    deadline = time.monotonic() + timeout
    port = int(server.url.rsplit(":", 1)[1])
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if path is None:
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    return
            with urllib.request.urlopen(f"{server.url}{path}", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{server.name} did not answer {path} within {timeout:.0f} s:\n{server.log_tail()}")


def _start(name: str, cmd: list[str], root: Path, cwd: Path, port: int, token: str, ready: str, timeout):
    log = root / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=sandbox_env(root), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(name, proc, f"http://127.0.0.1:{port}", token, log, root)
    try:
        _wait_ready(server, ready, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def start_lab(root: Path, nb_dir: Path, timeout: float = 90.0) -> Server:
    """JupyterLab serving ``nb_dir``, with ``window.jupyterapp`` exposed for the test."""
    port, token = free_port(), secrets.token_hex(16)
    cmd = [
        str(BIN / "jupyter"),
        "lab",
        "--no-browser",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={nb_dir}",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--ServerApp.terminals_enabled=False",
        "--ServerApp.allow_root=True",
        "--LabApp.extension_manager=readonly",
        "--MappingKernelManager.cull_idle_timeout=0",
    ]
    return _start("jupyterlab", cmd, root, nb_dir, port, token, f"/api/status?token={token}", timeout)


def start_voila(root: Path, nb_dir: Path, notebook: str, timeout: float = 90.0) -> Server:
    """Voilà rendering one notebook as an app (as ``make demo`` does)."""
    port = free_port()
    cmd = [
        str(BIN / "voila"),
        notebook,
        "--no-browser",
        f"--port={port}",
        "--Voila.ip=127.0.0.1",
        "--Voila.port_retries=0",
    ]
    # Voilà executes the notebook when its page is requested, so only wait for the port here.
    return _start("voila", cmd, root, nb_dir, port, "", None, timeout)
