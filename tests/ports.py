"""Ports for the servers tests start: one rule for the whole suite.

``scripts/vllm_cpu.free_port`` picks below the kernel's ephemeral range, so a port picked now
cannot be taken by some process's outbound connection or port-0 bind before our server binds
it, and never hands the same port out twice in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from vllm_cpu import free_port

__all__ = ["free_port"]
