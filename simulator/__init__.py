"""Engine model, emulator and cluster simulator.

The engine model and the cluster simulator are pure and synchronous (virtual time passed in);
the emulator's HTTP/ZMQ front is the async part. Imports ``policies``, never ``router``.
"""
