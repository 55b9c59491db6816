"""Several serving processes on one port: a small supervisor and a metrics endpoint that merges them.

Python runs one thread of Python at a time, so one serving process uses about one core however
many onnxruntime threads it has. With ``workers`` > 1 the entry point forks that many workers
before anything is loaded; each binds the same gRPC (and HTTP) port with SO_REUSEPORT, so the
kernel spreads connections over them, and each has its own session, batcher and metrics registry
on an internal port. The supervisor:

- serves one metrics endpoint that merges the workers' registries (counters, histograms and
  gauges summed; ``*_info`` gauges by maximum), so dashboards see one service, as Prometheus's
  multiprocess mode would, without its shared files;
- forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) to every worker, and restarts a worker that
  dies while serving;
- writes the port file once every worker is SERVING.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from services.core.settings import ServiceSettings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
RESTART_BACKOFF_S = 1.0


def _state_dir() -> Path:
    """A private directory for the workers' port files: the temporary directory, or /dev/shm in a
    container whose root filesystem (and /tmp) is read-only."""
    for parent in (None, "/dev/shm"):
        try:
            return Path(tempfile.mkdtemp(prefix=f"nnserve-{os.getpid()}-", dir=parent))
        except OSError:
            continue
    raise OSError("no writable temporary directory for the workers' state (mount a tmpfs on /tmp)")


def free_port(host: str) -> int:
    """A port no one listens on now (the workers then share it with SO_REUSEPORT)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host if host not in ("0.0.0.0", "::") else "", 0))
        return int(s.getsockname()[1])


def merge_expositions(texts: Iterable[str]) -> str:
    """One Prometheus text exposition from several processes' expositions of the same metrics.

    Samples with the same name and labels are summed (counters, histogram buckets, sums and
    counts, gauges such as queue depth and in-flight calls); ``*_info`` gauges take the maximum;
    ``*_created`` timestamps are dropped, since no single process's start is the series' start.
    """
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            _, _, samples = families.setdefault(family.name, (family.type, family.documentation, {}))
            take_max = family.type in ("gauge", "info") and family.name.endswith("_info")
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in samples:
                    samples[key] = max(samples[key], sample.value) if take_max else samples[key] + sample.value
                else:
                    samples[key] = sample.value
    lines = []
    for name, (kind, documentation, samples) in families.items():
        if not samples:
            continue
        exposed = name if kind != "counter" else name + "_total" if not name.endswith("_total") else name
        lines.append(f"# HELP {exposed} {_escape_help(documentation)}")
        lines.append(f"# TYPE {exposed} {kind}")
        for (sample_name, labels), value in samples.items():
            rendered = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(
                f"{sample_name}{{{rendered}}} {_number(value)}" if labels else f"{sample_name} {_number(value)}"
            )
    return "\n".join(lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


class _MergedMetrics(BaseHTTPRequestHandler):
    ports: list[int] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        texts = []
        for port in list(self.ports):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                    texts.append(reply.read().decode())
        body = merge_expositions(texts).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        pass


def supervise(
    settings: ServiceSettings,
    run_worker: Callable[[ServiceSettings, Path], int],
    port_file: Path | None,
) -> int:
    """Fork ``settings.workers`` workers that each run ``run_worker(settings, port_file)``; supervise them.

    Returns 0 after a clean drain, 2 when the workers could not start.
    """
    count = settings.workers
    port = settings.port or free_port(settings.host)
    run_dir = _state_dir()
    update: dict[str, Any] = {"port": port, "metrics_port": 0, "metrics_host": "127.0.0.1"}
    http_port = getattr(settings, "http_port", None)
    if http_port == 0:  # one port for all workers, as for gRPC, or each would bind its own
        update["http_port"] = free_port(getattr(settings, "http_host", settings.host))
    worker_settings = settings.model_copy(update=update)
    stopping = threading.Event()
    workers: dict[int, int] = {}  # pid -> worker index

    def start(index: int) -> None:
        worker_file = run_dir / f"worker-{index}.json"
        worker_file.unlink(missing_ok=True)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                with contextlib.suppress(OSError, AttributeError):  # end with the supervisor, however it ends
                    ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
                code = run_worker(worker_settings, worker_file)
            finally:
                os._exit(code)
        workers[pid] = index

    def forward(sig: int, _frame: object) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping.set()
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(count):
        start(index)
    ready = [run_dir / f"worker-{i}.json" for i in range(count)]
    while not all(p.exists() for p in ready):
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid, status = -1, 0
        if pid or stopping.is_set():
            if pid:
                workers.pop(pid, None)
                log.error("a worker exited before serving (status %s); stopping the others", status)
            forward(signal.SIGTERM, None)
            _reap(workers)
            return 2
        time.sleep(0.05)
    infos = [json.loads(p.read_text()) for p in ready]
    _MergedMetrics.ports = [int(info["metrics_port"]) for info in infos if info.get("metrics_port")]
    metrics_port = None
    if settings.metrics_port is not None:
        httpd = ThreadingHTTPServer((settings.metrics_host, settings.metrics_port), _MergedMetrics)
        threading.Thread(target=httpd.serve_forever, daemon=True, name="metrics").start()
        metrics_port = httpd.server_address[1]
    log.info("%d workers serving on %s:%d (metrics merged on %s)", count, settings.host, port, metrics_port)
    if port_file is not None:
        info = {
            **infos[0],
            "metrics_port": metrics_port,
            "workers": count,
            "pids": sorted(workers),
            "worker_metrics_ports": _MergedMetrics.ports,
        }
        tmp = port_file.with_suffix(port_file.suffix + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(port_file)
    codes = []
    while workers:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in workers:
            continue
        index = workers.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping.is_set():
            codes.append(code)
            continue
        log.error("worker %d (pid %d) exited with %s while serving; starting another", index, pid, code)
        time.sleep(RESTART_BACKOFF_S)
        start(index)
        _MergedMetrics.ports = _wait_ports(run_dir, count)
    return max((c for c in codes if c > 0), default=0)


def _wait_ports(run_dir: Path, count: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    files = [run_dir / f"worker-{i}.json" for i in range(count)]
    while time.monotonic() < deadline and not all(f.exists() for f in files):
        time.sleep(0.1)
    return [int(json.loads(f.read_text())["metrics_port"]) for f in files if f.exists()]


def _reap(workers: dict[int, int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while workers and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            workers.pop(pid, None)
        else:
            time.sleep(0.05)
    for pid in list(workers):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
