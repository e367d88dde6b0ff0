"""The prefill-time model the KV-aware policy uses to turn tokens into seconds.

Prefilling ``new`` tokens of a prompt whose first ``cached`` tokens already have KV costs

    linear_s_per_token * new + attention_s_per_token_pair * new * (new + cached)   seconds

(each new token passes through the weights once and attends to its whole context). Defaults
are the least-squares fit of full prefills of Llama-3.1-8B measured on one H200
(``/work/shared/calibration/README.md``: 29.3 us per token + 0.393 ns per token pair, ~0.25 s
for 8k tokens cold). Calibrate per fleet by refitting the two coefficients. Pure arithmetic;
must not import anything outside the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PrefillCost"]


@dataclass(frozen=True, slots=True)
class PrefillCost:
    linear_s_per_token: float = 29.3e-6
    attention_s_per_token_pair: float = 0.393e-9

    def __post_init__(self) -> None:
        if self.linear_s_per_token < 0 or self.attention_s_per_token_pair < 0:
            raise ValueError("prefill cost coefficients must be >= 0")

    def seconds(self, new_tokens: float, cached_tokens: float = 0.0) -> float:
        """Predicted time to prefill ``new_tokens`` after ``cached_tokens`` of cached context."""
        if new_tokens <= 0:
            return 0.0
        return new_tokens * (
            self.linear_s_per_token
            + self.attention_s_per_token_pair * (new_tokens + cached_tokens)
        )
