"""The ``kvrouter`` command line: the one place that joins ``router`` and ``simulator``.

``router`` (the live service) and ``simulator`` (engine model, emulator, cluster simulator)
never import each other; commands that need both, such as the demo, live here.
"""
