"""The simulator's command-line fronts: ``kvrouter simulate``, ``replay`` and ``tune``."""
