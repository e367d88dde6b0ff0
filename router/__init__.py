"""The live asyncio service: the proxy, the backend pool, health, metrics and all other I/O.

``router`` imports ``policies`` and never ``simulator`` (and ``simulator`` never imports it).
"""
