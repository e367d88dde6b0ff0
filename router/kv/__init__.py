"""The KV room: engines' KV-cache events in, the prefix index (``policies.kv.index``) kept current.

``wire`` decodes vLLM's and SGLang's msgpack events, ``events`` runs the ZMQ subscribers and the
replay catch-up, ``sources`` finds each backend's event endpoints, ``auth`` admits only the
backends' addresses, ``metrics`` counts it all, ``parity`` checks predicted against reported hits.
"""
