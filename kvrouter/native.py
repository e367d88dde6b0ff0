"""The request path compiled to C with mypyc, used only while it matches the sources.

kvrouter is typed strictly enough for mypyc, which compiles annotated Python modules to C
extensions with the same behaviour. The modules below are the per-request work: kv_aware's
scoring and bookkeeping, the prefix index, block hashing, replica sync's ledger and wire, the
proxy's dispatch, its HTTP server and client, the backend pool and its breakers, the metrics
every request updates, the prompt's tokenizer path and token parity, and the KV events'
decoding and ingestion (every engine step's batch passes through them). Compiled, kv_aware's
own cost per request halves and a router process carries ~1.3-1.4x the requests
(bench/README.md, "The request path compiled").

``make native`` (``python -m kvrouter.native build``) compiles them into ``build/native/`` of
the source tree (``KVROUTER_NATIVE_DIR`` elsewhere), beside a manifest of each source's
SHA-256. Every ``kvrouter`` command then loads them (``enable``) if and only if every listed
source still has the hash it was compiled from and the interpreter is the one that built
them; otherwise it says why in one log line and runs the Python sources, so an edit is never
shadowed by a stale build. ``KVROUTER_NATIVE=0`` turns it off. Nothing else changes: the
sources stay the reference, the tests run them (``KVROUTER_NATIVE=1 pytest`` runs them
compiled), and without a build kvrouter is pure Python as before.

Not compiled, and why: ``policies/types.py``, whose ``value_type`` decorator mypyc cannot
build (``dataclass_transform`` sets an attribute on the decorator, which a compiled function
does not have); ``router/pd/serving.py`` (a ``break`` inside ``try/finally``); and modules off
the per-request path. A compiled module must not alias a method in its class body
(``describe = collect`` builds with a warning and fails at import), and may subclass
``Exception`` but no other builtin exception. Compiled code checks annotations at run time (a
list where the annotation says tuple raises), which is why ``make test`` runs the whole suite
on the build too.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["MODULES", "build", "default_dir", "describe", "enable", "enable_from_env", "status"]

log = logging.getLogger("kvrouter.native")

MODULES: tuple[str, ...] = (
    "policies.kv_aware",
    "policies.prefill_cost",
    "policies.kv_commitment",
    "policies.placement",
    "policies.preemption_backoff",
    "policies.replica_sync",
    "policies.disaggregation",
    "policies.kv.index",
    "policies.kv.lookup",
    "policies.kv.hashing",
    "policies.kv.shared",
    "policies.kv.feed",
    "policies.kv.refresh",
    "policies.kv.peers",
    "policies.bookkeeping",
    "router.kv.wire",
    "router.kv.events",
    "router.kv.parity",
    "router.pool",
    "router.breaker",
    "router.hot_metrics",
    "router.metrics",
    "router.setup.kv",
    "router.proxy",
    "router.attempt",
    "router.http.server",
    "router.http.client",
    "router.http.connection",
    "router.http.messages",
    "router.http.upstream",
    "router.prompt.analyzer",
    "router.prompt.token_analyzer",
    "router.prompt.tokenize",
    "router.prompt.tokenize_cache",
    "router.prompt.word_encoder",
    "router.sync.service",
    "router.sync.unix",
    "router.sync.wire",
    "router.sync.peers",
)

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"


def default_dir() -> Path:
    return Path(os.environ.get("KVROUTER_NATIVE_DIR") or ROOT / "build" / "native")


def _source(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _abi() -> str:
    return str(sysconfig.get_config_var("EXT_SUFFIX"))


def build(out: Path | None = None, modules: Sequence[str] = MODULES) -> Path:
    """Compile ``modules`` into ``out`` (default ``default_dir()``) and write its manifest.
    Needs mypy (mypyc) and a C compiler; raises on any failure, leaving no half-built
    manifest behind."""
    from mypyc.build import mypycify
    from setuptools import Distribution

    out = out or default_dir()
    sources = {m: _source(m) for m in modules}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"not in the source tree: {', '.join(missing)}")
    hashes = {m: _digest(p) for m, p in sources.items()}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="kvrouter-native-") as tmp:
        cwd = os.getcwd()
        os.chdir(ROOT)  # mypy resolves the project's imports and reads its config from here
        try:
            extensions = mypycify([str(p.relative_to(ROOT)) for p in sources.values()],
                                  opt_level="3", target_dir=str(Path(tmp) / "c"))
            dist = Distribution({"name": "kvrouter-native", "ext_modules": extensions})
            command = dist.get_command_obj("build_ext")
            command.build_lib = str(out)
            command.build_temp = str(Path(tmp) / "o")
            command.inplace = False
            dist.run_command("build_ext")
        finally:
            os.chdir(cwd)
    built = {p.name for p in out.rglob(f"*{_abi()}")}
    shared = sorted(name.removesuffix(_abi()) for name in built if "__mypyc" in name)
    (out / MANIFEST).write_text(json.dumps(
        {"abi": _abi(), "python": sys.version.split()[0], "modules": hashes,
         "shared": shared}, indent=1))
    return out


def status(directory: Path | None = None) -> tuple[dict[str, Path], str]:
    """(module -> compiled file, '') when the build at ``directory`` matches every source and
    this interpreter; else ({}, why not)."""
    directory = directory or default_dir()
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return {}, f"no native build at {directory} (make native builds one)"
    try:
        manifest = json.loads(manifest_path.read_text())
        hashes: dict[str, str] = dict(manifest["modules"])
        shared: list[str] = list(manifest["shared"])
        abi = str(manifest["abi"])
    except (ValueError, KeyError, TypeError) as exc:
        return {}, f"unreadable native manifest {manifest_path}: {exc}"
    if abi != _abi():
        return {}, f"native build is for {abi}, this interpreter loads {_abi()}"
    stale = [m for m, h in hashes.items()
             if not _source(m).is_file() or _digest(_source(m)) != h]
    if stale:
        return {}, (f"native build is stale ({_source(stale[0]).relative_to(ROOT)} changed"
                    f"{f' and {len(stale) - 1} more' if len(stale) > 1 else ''}); "
                    "running the Python sources (make native rebuilds it)")
    files: dict[str, Path] = {}
    for name in [*hashes, *shared]:
        path = directory.joinpath(*name.split(".")).with_name(name.split(".")[-1] + _abi())
        if not path.is_file():
            return {}, f"native build incomplete: {path} is missing"
        files[name] = path
    return files, ""


class _Finder(importlib.abc.MetaPathFinder):
    """Serves the compiled modules (and mypyc's shared library) ahead of the sources."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def enable(directory: Path | None = None) -> tuple[list[str], str]:
    """Load the compiled modules from here on, when the build matches (``status``): returns
    (the modules, '') or ([], why not). Must run before any of them is imported; one that
    already is would keep its Python version beside compiled callers, so then nothing is
    enabled."""
    for finder in sys.meta_path:  # enabled already (the test run, then kvrouter.cli)
        if isinstance(finder, _Finder):
            return _compiled(finder.files), ""
    files, why = status(directory)
    if not files:
        return [], why
    early = [m for m in files if m in sys.modules]
    if early:
        return [], f"native build not used: {early[0]} was imported before it could load"
    sys.meta_path.insert(0, _Finder(files))
    return _compiled(files), ""


def _compiled(files: dict[str, Path]) -> list[str]:
    return sorted(m for m in files if "__mypyc" not in m)


def enable_from_env() -> tuple[list[str], str]:
    """``enable`` unless ``KVROUTER_NATIVE`` is 0 (every ``kvrouter`` command calls this)."""
    if os.environ.get("KVROUTER_NATIVE", "") == "0":
        return [], "native build off (KVROUTER_NATIVE=0)"
    return enable()


def describe(directory: Path | None = None) -> str:
    """One line for a benchmark's output: whether ``kvrouter`` commands started now would run
    the build or, and why, the sources (a stale build falls back silently but for one log
    line, and its figures are the sources')."""
    if os.environ.get("KVROUTER_NATIVE", "") == "0":
        return "kvrouter runs its Python sources (KVROUTER_NATIVE=0)"
    files, why = status(directory)
    return f"kvrouter runs its native build ({len(MODULES)} modules)" if files else why


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["build"]:
        try:
            out = build(Path(args[1]) if len(args) > 1 else None)
        except ImportError as exc:  # mypyc comes with mypy (the test extras)
            print(f"native build needs mypy's mypyc: pip install mypy ({exc})", file=sys.stderr)
            return 1
        except Exception as exc:  # setuptools' CompileError and LinkError: no or a broken cc
            print(f"native build failed: {exc} (needs a C compiler, cc)", file=sys.stderr)
            return 1
        print(f"native build: {len(MODULES)} modules compiled into {out}")
        return 0
    if args[:1] == ["status"]:
        files, why = status(Path(args[1]) if len(args) > 1 else None)
        print(f"native build: {len(MODULES)} modules, current" if files else why)
        return 0 if files else 1
    print("usage: python -m kvrouter.native build|status [DIR]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
