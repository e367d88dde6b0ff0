"""The prompt room: from a request body to what a policy sees (``RouteRequest``).

``analyzer`` validates the body and estimates tokens without a tokenizer; ``token_analyzer``
tokenizes exactly as the engine will (``tokenize``, ``chat_render``, ``word_encoder``,
``tokenize_cache``) and hashes the prompt into the engine's KV blocks.
"""
