"""The ``kvrouter`` command line: the one place that joins ``router`` and ``simulator``.

``router`` (the live service) and ``simulator`` (engine model, emulator, cluster simulator)
never import each other; commands that need both, such as the demo, live here.
"""

__version__ = "0.1.0"
"""The source tree's version when kvrouter runs uninstalled; pyproject.toml reads it from here."""
