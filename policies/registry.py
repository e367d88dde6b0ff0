"""Policy names and how to build them: the one table config, CLI and simulator consult.

Each policy module exposes ``create(params, rng) -> Policy``. Modules are imported on demand so
a missing optional policy never breaks the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
from collections.abc import Mapping

from policies.params import ParamError
from policies.types import Policy

__all__ = ["POLICY_MODULES", "build_policy", "policy_names"]

POLICY_MODULES: dict[str, str] = {
    "round_robin": "policies.round_robin",
    "random": "policies.random_pick",
    "least_loaded": "policies.least_loaded",
    "power_of_two": "policies.power_of_two",
    "session_affinity": "policies.session_affinity",
    "consistent_hash": "policies.consistent_hash",
    "sglang_cache_aware": "policies.sglang_cache_aware",
    "kv_aware": "policies.kv_aware",
}


def policy_names() -> list[str]:
    """Names whose module is present, in table order."""
    names = []
    for name, module in POLICY_MODULES.items():
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


def build_policy(
    name: str, params: Mapping[str, object] | None, rng: random.Random
) -> Policy:
    """Build policy ``name``; raises ParamError naming ``policy.name`` or the bad parameter."""
    module_name = POLICY_MODULES.get(name)
    if module_name is None or importlib.util.find_spec(module_name) is None:
        raise ParamError("policy.name", f"unknown policy {name!r} (known: {', '.join(policy_names())})")
    module = importlib.import_module(module_name)
    policy: Policy = module.create(params or {}, rng)
    return policy
