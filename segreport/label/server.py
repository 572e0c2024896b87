"""``segreport label``: start a MONAI Label server over segreport's bundles (a thin wrapper over
``monailabel start_server``).

  segreport label --studies DIR [--host 127.0.0.1] [--port 8000] [--bundles bundles/lesion_report_3d ...]
                  [--app-dir outputs/label_app] [--device cpu|cuda] [--max-images 4]

- Binds 127.0.0.1 unless ``--host`` says otherwise (``0.0.0.0`` to serve other machines).
- ``--bundles``: names or folders; default every bundle shipped with segreport that has trained weights
  (the app's own from MONAI Label training, ``<bundle>/models/model.pt`` where its training writes them,
  or ``$SEGREPORT_HOME/<bundle>/model.pt``); a bundle named here without weights is refused with the
  command that trains it.
- MONAI Label writes into the app folder (``main.py`` written here, ``model/`` for weights it trains,
  ``logs/``, ``train/``) and into the studies folder (``labels/`` and ``datastore_v2.json``), never into
  the installed package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

MAIN_PY = '''"""MONAI Label app folder written by `segreport label`; the app is segreport.label.app."""

from segreport.label.app import SegreportLabelApp  # noqa: F401  (MONAI Label finds the MONAILabelApp subclass here)
'''


class LabelError(RuntimeError):
    """The server cannot start: said before anything is launched."""


def weight_paths(bundle: Path, app_dir: Path) -> list[Path]:
    """Where a bundle's served weights may be, first found wins: the app's own (MONAI Label training
    writes ``<app>/model/<bundle name>/model.pt``), then the bundle's ``models/``, then the user folder
    (``$SEGREPORT_HOME/<bundle name>/``; segreport.run.bundles.weight_candidates)."""
    from ..run.bundles import weight_candidates

    return [app_dir / "model" / bundle.name / "model.pt", *weight_candidates(bundle)]


def trained_weights(bundle: Path, app_dir: Path) -> Path | None:
    return next((p for p in weight_paths(bundle, app_dir) if p.is_file()), None)


def resolve_bundles(given: Sequence[str] | None, app_dir: Path) -> list[Path]:
    """The bundle folders to serve: those named (by name or folder; each must have trained weights), or
    every trained one of the bundles shipped with segreport."""
    from ..run.bundles import BundleError, find_bundle, shipped_bundles, shipped_bundles_dir
    if given:
        try:
            bundles = [find_bundle(b) for b in given]
        except BundleError as err:
            raise LabelError(str(err)) from None
        for b in bundles:
            if trained_weights(b, app_dir) is None:
                raise LabelError(f"{b.name}: no trained weights at {b / 'models' / 'model.pt'}; train it first: "
                                 f"python -m monai.bundle run training --config_file {b / 'configs' / 'train.yaml'}")
        return bundles
    found = shipped_bundles()
    bundles = [b for b in found if trained_weights(b, app_dir) is not None]
    if not bundles:
        raise LabelError(f"no bundle under {shipped_bundles_dir()} has trained weights ({', '.join(b.name for b in found) or 'no bundles'}); "
                         f"train one first, e.g. python -m monai.bundle run training --config_file "
                         f"bundles/lesion_report_3d/configs/train.yaml")
    return bundles


def prepare_app_dir(app_dir: Path) -> Path:
    app_dir.mkdir(parents=True, exist_ok=True)
    main = app_dir / "main.py"
    if not main.is_file() or main.read_text() != MAIN_PY:
        main.write_text(MAIN_PY)
    return app_dir.absolute()


def server_command(studies: Path, bundles: Sequence[Path], app_dir: Path, host: str = "127.0.0.1", port: int = 8000,
                   device: str | None = None, max_images: int = 4) -> list[str]:
    """``python -m monailabel.main start_server`` with this app and the segreport ASGI app (4xx handlers)."""
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies", str(studies),
           "--host", host, "--port", str(port), "--uvicorn_app", "segreport.label.asgi:app",
           "--conf", "bundles", os.pathsep.join(map(str, bundles)), "--conf", "max_images", str(max_images)]
    if device:
        cmd += ["--conf", "device", device]
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="segreport label", description=__doc__.splitlines()[0])
    p.add_argument("--studies", required=True, help="folder of NIfTI/DICOM studies (MONAI Label's datastore)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--bundles", nargs="*", help="bundle names or folders (default: every shipped bundle with trained weights)")
    p.add_argument("--app-dir", default="outputs/label_app", help="the MONAI Label app folder (written by MONAI Label)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-images", type=int, default=4, help="images whose click session is kept (default 4)")
    a = p.parse_args(argv)
    studies = Path(a.studies).absolute()
    try:
        if not studies.is_dir():
            raise LabelError(f"{studies}: --studies must be an existing folder of studies")
        app_dir = prepare_app_dir(Path(a.app_dir))
        bundles = resolve_bundles(a.bundles, app_dir)
    except LabelError as exc:
        print(f"segreport label: error: {exc}", file=sys.stderr)
        return 2
    print(f"segreport label: serving {', '.join(b.name for b in bundles)} on http://{a.host}:{a.port} "
          f"(app folder {app_dir}, studies {studies})", flush=True)
    cmd = server_command(studies, bundles, app_dir, a.host, a.port, a.device, a.max_images)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the server replaces this process: Ctrl-C and signals reach it directly


# ----------------------------------------------------------------------------- tests, benchmarks
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(studies: Path, bundles: Sequence[Path], app_dir: Path, log_file: Path, timeout: float = 180.0,
                   device: str = "cpu", cwd: Path | None = None) -> Iterator[str]:
    """A real server on 127.0.0.1 and a free port, started through ``segreport label``; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "segreport.cli", "label", "--studies", str(studies), "--port", str(port),
           "--app-dir", str(app_dir), "--device", device, "--bundles", *map(str, bundles)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_file, "w") as log:
        # its own process group, so that stopping it stops every process the server started
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited ({proc.returncode}); its log {log_file}:\n{log_file.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/info/", timeout=5) as r:
                        json.loads(r.read())
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no answer from {url}/info/ in {timeout:.0f} s; log {log_file}") from None
                    time.sleep(0.5)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
