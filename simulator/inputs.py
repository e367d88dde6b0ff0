"""What a simulated run is given besides the trace: the cluster's configuration, and the
characters a hash-only prompt shows to character-matching policies.

Pure; must not import ``router``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import xxhash

from simulator.engine.cost_model import DEFAULT_PROFILE
from simulator.traces import SIM_MODEL, TraceRequest

__all__ = ["OPTIONAL_FIELDS", "TIER_FIELDS", "SimConfig", "config_dict", "prompt_text_of"]

TIER_FIELDS = ("cpu_offload_tokens", "shared_store_tokens")
"""KV tiers below HBM (issue 18)."""
OPTIONAL_FIELDS = (*TIER_FIELDS, "returning_gap_s")
"""Written to results.json only when set, so runs without them keep the exact results.json
they had before these fields existed."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything about a simulated cluster except the trace and the policy."""

    backends: int = 16
    cost_profile: str = DEFAULT_PROFILE
    num_gpu_blocks: int = 0  # per engine; 0 = what the profile's KV memory holds
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int = 1_048_576
    scrape_interval_s: float = 1.0
    engine_signals_max_age_s: float = 15.0
    event_delay_s: float = 0.0
    event_loss_ratio: float = 0.0
    kv_events: bool = True
    slo_ttft_s: float = 2.0
    chars_per_token: int = 4
    model: str = SIM_MODEL
    seed: int = 0
    cpu_offload_tokens: int = 0  # per engine: vLLM native CPU offloading; 0 = off
    shared_store_tokens: int = 0  # fleet-wide: one LMCache/Mooncake-style store; 0 = off
    returning_gap_s: float = 0.0  # a session's request this long after its previous one is a
    # "returning" turn, measured apart (returning_* in results.json); 0 = off
    slow_backends: tuple[tuple[int, float], ...] = ()  # (engine index, factor): that engine's
    # every step lasts factor times longer (a throttled or older GPU), as ``emulate --slow-pod``

    @property
    def tiered(self) -> bool:
        return bool(self.cpu_offload_tokens or self.shared_store_tokens)

    def __post_init__(self) -> None:
        if self.backends < 1:
            raise ValueError("simulation.backends must be >= 1")
        if not 0.0 <= self.event_loss_ratio <= 1.0:
            raise ValueError("simulation.event_loss_ratio must be within [0, 1]")
        if self.event_delay_s < 0 or self.scrape_interval_s <= 0 or self.chars_per_token < 1:
            raise ValueError(
                "simulation: event_delay_s must be >= 0, scrape_interval_s > 0, chars_per_token >= 1"
            )
        for name in OPTIONAL_FIELDS:
            if getattr(self, name) < 0:
                raise ValueError(f"simulation.{name} must be >= 0")
        for index, factor in self.slow_backends:
            if not 0 <= index < self.backends or factor <= 0:
                raise ValueError(
                    f"simulation.slow_backends: ({index}, {factor}) needs 0 <= index < "
                    f"{self.backends} and factor > 0")


def config_dict(config: SimConfig) -> dict[str, Any]:
    """``asdict(config)`` without the optional fields that are off (``OPTIONAL_FIELDS``)."""
    out = asdict(config)
    for name in (*OPTIONAL_FIELDS, "slow_backends"):
        if not out[name]:
            del out[name]
    return out


def prompt_text_of(request: TraceRequest, chars_per_token: int) -> str:
    """Deterministic characters for a hash-only prompt: block ``k`` -> a pattern of its key.

    Two prompts share exactly their shared blocks' characters (different keys' patterns differ
    from the first character with probability 15/16), which is what character matchers need.
    """
    if request.text is not None:
        return request.text
    if request.messages is not None:
        return "".join(str(m.get("content", "")) for m in request.messages)
    per_block = request.block_size * chars_per_token
    parts = []
    remaining = request.input_tokens * chars_per_token
    for key in request.hash_ids:
        # Keys may be unsigned 64-bit hashes or negative invented ids: fold into 8 bytes.
        pattern = xxhash.xxh64_hexdigest((key % (1 << 64)).to_bytes(8, "little"))
        n = min(per_block, remaining)
        parts.append((pattern * (n // 16 + 1))[:n])
        remaining -= n
    return "".join(parts)


def parse_slowdowns(specs: list[str], count: int, flag: str) -> dict[int, float]:
    """``INDEX=FACTOR`` flags (``simulate --slow-backend``, ``emulate --slow-pod``) -> {index:
    factor}; a bad one is a one-line ValueError naming ``flag``."""
    out: dict[int, float] = {}
    for spec in specs:
        index, sep, factor = spec.partition("=")
        try:
            i, f = int(index), float(factor)
        except ValueError:
            i, f = -1, 0.0
        if not sep or not 0 <= i < count or not f > 0:
            raise ValueError(
                f"{flag} {spec!r}: expected INDEX=FACTOR with 0 <= INDEX < {count} and "
                "FACTOR > 0, e.g. 0=4"
            )
        out[i] = f
    return out
