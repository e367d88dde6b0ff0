"""The values the engine model (``simulator.engine.model``) takes and returns: its configuration, a
request, one request's progress in a step, and a step's result. Frozen slotted dataclasses.

Must not import ``router``, asyncio or anything beyond ``policies.kv.events``.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.kv.events import KvEvent

__all__ = ["EngineConfig", "EngineRequest", "RequestOutput", "StepResult"]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16
    num_gpu_blocks: int = 8192
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int = 131072
    cpu_offload_blocks: int = 0
    """vLLM native CPU offloading (``kv_offloading_size``) in blocks; 0 = off."""

    def __post_init__(self) -> None:
        for name in ("block_size", "num_gpu_blocks", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"engine.{name} must be > 0, got {getattr(self, name)}")
        if self.cpu_offload_blocks < 0:
            raise ValueError(f"engine.cpu_offload_blocks must be >= 0, got {self.cpu_offload_blocks}")


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    prompt_tokens: int
    max_tokens: int
    block_keys: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    report_hits: bool = False
    """vLLM's ``kv_cache_report_mode: full``: re-announce the blocks this request hits as one
    BlockStored with ``parent_block_hash`` None (so a router can check its view of them)."""


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One request's progress in one step (it produced exactly one token)."""

    request_id: str
    output_tokens: int
    """Tokens generated so far, this one included."""
    first_token: bool
    finished: bool
    cached_tokens: int
    """Prompt tokens not computed at (last) admission: GPU prefix-cache hits plus tokens
    loaded from the CPU offload tier and the shared store (vLLM's ``num_cached_tokens``)."""
    prompt_tokens: int
    arrival_s: float
    cpu_cached_tokens: int = 0
    """Of ``cached_tokens``, those loaded from the CPU offload tier."""
    shared_cached_tokens: int = 0
    """Of ``cached_tokens``, those loaded from the fleet-shared store."""


@dataclass(frozen=True, slots=True)
class StepResult:
    start_s: float
    end_s: float
    outputs: tuple[RequestOutput, ...]
    """Requests whose first token or last token came out of this step (both flags may hold)."""
    decoded: tuple[str, ...]
    """Requests that produced one other (middle) token in this step."""
    events: tuple[KvEvent, ...]
    preempted: tuple[str, ...]
    prefill_tokens: int
    decode_requests: int
    load_wait: bool = False
    """Nothing computed: the step only waits for a tier load to finish (not busy time)."""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s
