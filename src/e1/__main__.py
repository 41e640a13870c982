"""`python -m e1`: the workflow's jobs start here. With E1_SRC set (the rules set it), refuse to run an e1
imported from anywhere but that checkout: a job must run the code Snakemake tracks."""

import os
import sys
from pathlib import Path

import e1

_want = os.environ.get("E1_SRC")
_have = Path(e1.__file__).resolve().parent.parent
if _want and _have != Path(_want).resolve():
    print(f"e1: this job must run the package of {_want} (the checkout whose Snakefile planned it), but Python "
          f"imported e1 from {_have}; put {_want} first on PYTHONPATH (the workflow's rules do)", file=sys.stderr)
    raise SystemExit(2)

from e1.cli import main  # noqa: E402

raise SystemExit(main())
