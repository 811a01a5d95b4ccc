"""Aerie's benchmarks: `python -m bench.serving`, ...

Importing the package sets the services' OpenMP spin count for the bench and every
process it starts, before any of its modules imports torch (aerie_common.torch_threads).
"""

from aerie_common.torch_threads import set_openmp_spin_count

set_openmp_spin_count()
