"""e1: stage-aware latency decomposition of MolmoE-1B, and why FLOPs do not predict wall-clock."""

__version__ = "0.1.0"
