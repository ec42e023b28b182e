"""featsweep: Hydra-managed hyperparameter sweeps for channel visualization.

Flow (imports go one way): ``spec`` (config -> RunSpec) -> ``models`` -> ``targets`` ->
``optim`` / ``blur`` -> ``engine`` -> ``artifacts`` -> ``metrics`` -> ``analysis``.
"""

__version__ = "0.1.0"
