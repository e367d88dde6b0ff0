"""The KV block index, pure: block hashing as the engines do it (``hashing``), the event values
(``events``), applying events to a backend's blocks (``feed``) and the global prefix index
(``index``) that policies match prompts against; ``refresh`` tells a policy which chains it
recorded moments ago (no need to record them again); ``peers`` holds replica peers' in-flight
work as kv_aware reads it.
"""
