"""Replica sync between router replicas (``sync:`` config): config, wire format, peers and
the ZeroMQ PUB/SUB service. The state itself is pure, in ``policies.replica_sync``."""
