"""The engine model: one vLLM-like engine (``model``: scheduler + paged prefix cache + cost
model) in virtual time. Pure, synchronous, deterministic; must not import ``router`` or asyncio.
"""
