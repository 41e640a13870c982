"""e1: stage-aware latency decomposition of MolmoE-1B, and why FLOPs do not predict wall-clock."""

import time

__version__ = "0.1.0"
IMPORTED_AT = time.time()  # when a job's Python first imported e1 (its start-up cost is measured from here)
