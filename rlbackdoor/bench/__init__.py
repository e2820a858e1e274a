"""The benchmark matrix (``rlbd bench``) and local W&B sweeps (``rlbd sweep``).

- :mod:`~rlbackdoor.bench.matrix`: bench configs and their expansion into cells with stable ids.
- :mod:`~rlbackdoor.bench.cells`: one cell in a worker (train or reuse + evaluate, sanitize, detect).
- :mod:`~rlbackdoor.bench.backends`: a local process pool or Ray.
- :mod:`~rlbackdoor.bench.runner`: cells in dependency order, ``results.jsonl``, resuming; :func:`run_bench`.
- :mod:`~rlbackdoor.bench.report`: IQM and bootstrap CIs over seeds, CSV/markdown tables, plots, the W&B run.
- :mod:`~rlbackdoor.bench.sweep`: W&B sweep files expanded and run without a W&B server.
"""

from rlbackdoor.bench.matrix import BenchSpec, Cell, expand, load_bench
from rlbackdoor.bench.runner import BenchSummary, run_bench, run_cells

__all__ = ["BenchSpec", "BenchSummary", "Cell", "expand", "load_bench", "run_bench", "run_cells"]
