"""Pure, synchronous routing decisions shared by the live router and the simulator.

Nothing in this package does I/O, imports asyncio/aiohttp, reads a clock or uses the global
random module: time arrives as ``now_s`` in the view, randomness as an injected
``random.Random``. ``router`` and ``simulator`` import this package; it imports neither.
"""
