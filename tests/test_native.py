"""``kvrouter.native``: the request path compiled with mypyc is used only while it matches
the sources, routes exactly as the Python sources do, and serves real HTTP, workers included.

The build itself (mypyc and a C compiler, ~2 min) runs once for this module, or is the one
``make test`` made for unit-native (``KVROUTER_NATIVE_TEST_BUILD``, used only while current);
without a C compiler the tests that need it skip, saying so."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from fake_backend import FakeBackend, wait_until_ok
from ports import free_port

from kvrouter import native

ROOT = Path(__file__).resolve().parent.parent


def _fake_build(directory: Path, *, abi: str | None = None, wrong: str | None = None) -> None:
    """A manifest of the real sources' hashes beside empty stand-ins for the compiled files."""
    suffix = abi or str(native._abi())
    hashes = {}
    for module in native.MODULES:
        source = native._source(module)
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        hashes[module] = "0" * 64 if module == wrong else digest
        target = directory.joinpath(*module.split(".")).with_name(module.split(".")[-1] + suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")
    (directory / "abc__mypyc").with_name("abc__mypyc" + suffix).write_bytes(b"")
    (directory / native.MANIFEST).write_text(json.dumps(
        {"abi": suffix, "python": "3", "modules": hashes, "shared": ["abc__mypyc"]}))


def test_a_build_matching_every_source_is_usable(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    files, why = native.status(tmp_path)
    assert why == ""
    assert set(files) == {*native.MODULES, "abc__mypyc"}
    assert files["policies.kv_aware"] == tmp_path / "policies" / f"kv_aware{native._abi()}"


def test_a_changed_source_is_never_shadowed_by_its_old_build(tmp_path: Path) -> None:
    _fake_build(tmp_path, wrong="policies.kv_commitment")
    files, why = native.status(tmp_path)
    assert files == {}
    assert "stale (policies/kv_commitment.py changed)" in why


@pytest.mark.parametrize("case", ["none", "abi", "garbled", "incomplete"])
def test_a_build_that_cannot_be_used_says_why(tmp_path: Path, case: str) -> None:
    if case == "abi":
        _fake_build(tmp_path, abi=".cpython-99-other.so")
    elif case == "garbled":
        (tmp_path / native.MANIFEST).write_text("{not json")
    elif case == "incomplete":
        _fake_build(tmp_path)
        (tmp_path / "router" / "http" / f"messages{native._abi()}").unlink()
    files, why = native.status(tmp_path)
    assert files == {}
    expected = {"none": "no native build at", "abi": "native build is for .cpython-99-other.so",
                "garbled": "unreadable native manifest", "incomplete": "native build incomplete"}
    assert expected[case] in why


def test_modules_imported_before_the_build_keep_python_and_nothing_is_enabled(
    tmp_path: Path,
) -> None:
    # This process imported the Python policies already (conftest starts routers): loading a
    # compiled kv_aware now would put two kinds of the same classes side by side.
    _fake_build(tmp_path)
    before = list(sys.meta_path)
    modules, why = native.enable(tmp_path)
    assert modules == []
    assert "was imported before it could load" in why
    assert sys.meta_path == before


def test_kvrouter_native_0_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVROUTER_NATIVE", "0")
    assert native.enable_from_env() == ([], "native build off (KVROUTER_NATIVE=0)")


def test_benchmarks_are_told_which_code_their_routers_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KVROUTER_NATIVE", raising=False)
    _fake_build(tmp_path)
    assert native.describe(tmp_path) == f"kvrouter runs its native build ({len(native.MODULES)} modules)"
    _fake_build(tmp_path, wrong="policies.placement")
    assert "stale (policies/placement.py changed)" in native.describe(tmp_path)
    monkeypatch.setenv("KVROUTER_NATIVE", "0")
    _fake_build(tmp_path)
    assert native.describe(tmp_path) == "kvrouter runs its Python sources (KVROUTER_NATIVE=0)"


# ---- the real build ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # `make test` builds once for unit-native and names that build here; it is used only
    # while it matches these sources (native.status), else this module builds its own.
    given = os.environ.get("KVROUTER_NATIVE_TEST_BUILD")
    if given and native.status(Path(given))[0]:
        yield Path(given)
        return
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler (cc) on this machine: mypyc cannot build the native modules")
    out = tmp_path_factory.mktemp("native")
    native.build(out)
    yield out


def _env(built: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KVROUTER_NATIVE"}
    if built is None:
        env["KVROUTER_NATIVE"] = "0"
    else:
        env["KVROUTER_NATIVE_DIR"] = str(built)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_every_kvrouter_command_loads_the_compiled_modules(built: Path) -> None:
    code = ("import kvrouter.cli, policies.kv_aware as k, router.proxy as p, policies.types as t;"
            "from kvrouter import native;"
            "print(k.__file__); print(p.__file__); print(t.__file__);"
            "print(len(native.enable()[0]))")  # asked again: the same modules, nothing new
    out = subprocess.run([sys.executable, "-c", code], env=_env(built), cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(built / "policies" / f"kv_aware{native._abi()}")
    assert out[1] == str(built / "router" / f"proxy{native._abi()}")
    assert out[2] == str(ROOT / "policies" / "types.py")  # not in the set: the source
    assert out[3] == str(len(native.MODULES))


def _simulate(out: Path, built: Path | None) -> dict[str, object]:
    subprocess.run(
        [sys.executable, "-m", "kvrouter.cli", "simulate", "--quiet", "--jobs", "1",
         "--trace", "synthetic:multi_tenant,requests=600,rate=30", "--backends", "4",
         "--routers", "2", "--cpu-offload-tokens", "200000",
         "--policies", "kv_aware,sglang_cache_aware", "--out", str(out)],
        env=_env(built), cwd=ROOT, check=True, capture_output=True)
    results = json.loads((out / "results.json").read_text())
    return {r["policy"]: {k: v for k, v in r.items() if "wall" not in k} for r in results}


def test_compiled_kv_aware_routes_exactly_as_the_python_sources(
    built: Path, tmp_path: Path
) -> None:
    # Two replicas (replica sync), a CPU tier (tier pricing): every compiled module in play.
    compiled = _simulate(tmp_path / "native", built)
    python = _simulate(tmp_path / "python", None)
    assert compiled["kv_aware"]["routed"]  # the run routed something
    assert compiled == python


def _mapped(pid: int, built: Path) -> bool:
    """Has process ``pid`` loaded a compiled module of ``built``?"""
    try:
        return str(built) in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _children_with(pid: int, built: Path) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if _mapped(int(c), built)]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
async def test_serve_with_workers_runs_the_compiled_path_in_every_worker(
    built: Path, start_backend: Callable[..., Awaitable[FakeBackend]]
) -> None:
    backends = [await start_backend() for _ in range(2)]
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvrouter.cli", "serve", "--workers", "2", "--port", str(port),
        "--policy", "kv_aware", "--log-level", "info",
        *[a for b in backends for a in ("--backend", b.url)],
        env=_env(built), cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            await wait_until_ok(http, f"{url}/ready", proc)
            for i in range(8):
                async with http.post(f"{url}/v1/completions", json={
                        "model": "tiny", "prompt": f"request {i} " * 50, "max_tokens": 2}) as r:
                    assert r.status == 200, await r.text()
        assert sum(len(b.received) for b in backends) == 8
        workers = _children_with(proc.pid, built)
        assert len(workers) == 2, f"compiled modules in {len(workers)} of the workers"
    finally:
        proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert b"(request path compiled: make native)" in stderr
