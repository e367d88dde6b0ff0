"""Composition roots: where the rooms are wired together from a parsed config (``kv``: tokenizer,
index, event subscribers; ``discovery``: the backend sources). Nothing else builds them.
"""
