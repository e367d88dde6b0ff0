"""Emulated vLLM/SGLang pods on 127.0.0.1 (``kvrouter emulate``): real HTTP servers and ZMQ KV
events, each driven by the engine model (``simulator.engine``) in scaled wall-clock time.
Async; must not import ``router``.
"""
