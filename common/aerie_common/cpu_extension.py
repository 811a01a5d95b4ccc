"""The project's C++ CPU kernels (csrc/), built on first use with torch's C++ extension
tools (a C++ compiler and ninja) for the CPU they run on, and cached.

- packed_linear.cpp: products with weights kept in an exact packed form (packed_weights.py),
  for the verifier's target and the drafter's head;
- rotary.cpp: transformers' rotary embedding in one call (aerie_verifier/lean_forward.py);
- lean_layers.cpp: the lean forward's loop over the decoder layers, for a target whose
  projections are all packed (aerie_verifier/lean_forward.py);
- eagle_draft.cpp: the EAGLE head's steps and tree growth, for a head whose linear layers
  are all packed (aerie_drafter/native_draft.py).

Where the module cannot be built, ``load`` logs why and returns None, and the engine runs
without it: every caller has a fallback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import time
from pathlib import Path

from aerie_common.settings import AerieSettings

log = logging.getLogger(__name__)

SOURCES = ("module.cpp", "packed_linear.cpp", "rotary.cpp", "lean_layers.cpp", "eagle_draft.cpp")
# No build takes this long (about 2 minutes alone on a 2-core machine, more when loaded).
STALE_LOCK_S = 600.0

_module = None
_loaded = False


class CpuKernelSettings(AerieSettings):
    # Compiler flags added to the kernels' build (-O3 -march=native ...), as a shell would
    # split them: "-mno-avx512f" builds their AVX2 path, which an AVX2-only CPU runs, on an
    # AVX-512 one (docs/benchmarks.md).
    cpu_kernel_cflags: str = ""


def load():
    """The built module, or None where it cannot be built (once per process)."""
    global _module, _loaded
    if not _loaded:
        _loaded = True
        try:
            _module = build(tuple(shlex.split(CpuKernelSettings().cpu_kernel_cflags)))
        except Exception as error:  # no compiler or ninja: the engine runs as before
            log.warning("the C++ CPU kernels were not built (%s); running without them", error)
    return _module


def build(extra_cflags: tuple[str, ...] = ()):
    """The module built for this CPU, with ``extra_cflags`` added: the tests build the AVX2
    path on an AVX-512 CPU with ("-mno-avx512f",). Each set of flags has its own module
    name and build directory, so both can be loaded in one process."""
    from torch.utils import cpp_extension

    try:  # the ninja wheel's binary, for an environment that was not activated
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    csrc = Path(__file__).with_name("csrc")
    sources = [str(csrc / name) for name in SOURCES]
    # torch rebuilds when a source or a flag changes, not a header: the headers' hash goes
    # in as a flag.
    headers = hashlib.sha1(b"".join(path.read_bytes() for path in sorted(csrc.glob("*.h")))).hexdigest()[:12]
    # Built for this CPU (-march=native): a cache shared with another CPU must not reuse it.
    cpu = hashlib.sha1(_cpu_description().encode()).hexdigest()[:12]
    name = "aerie_cpu_kernels"
    if extra_cflags:
        name += "_" + hashlib.sha1(" ".join(extra_cflags).encode()).hexdigest()[:8]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    build_dir = root / f"{name}_{cpu}"
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("loading the C++ CPU kernels (built on first use: about 2 minutes on 2 cores)")
    clear_stale_lock(build_dir)
    return cpp_extension.load(
        name=name,
        sources=sources,
        # -fopenmp: at::parallel_for is inlined here, and runs serially without it. The
        # library it links is the libgomp.so.1 torch has already loaded, so both share one
        # OpenMP runtime and its threads. -ffp-contract=off: products and sums rounded
        # apart, as torch's elementwise operations round them (rotary.cpp).
        extra_cflags=[
            "-O3",
            "-march=native",
            "-fopenmp",
            "-ffp-contract=off",
            f"-DAERIE_HEADERS={headers}",
            *extra_cflags,
        ],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
    )


def clear_stale_lock(build_dir: Path, stale_after_s: float = STALE_LOCK_S) -> None:
    """torch's build lock is a file its build removes when done; a build killed midway (a
    first start stopped with Ctrl-C) leaves it, and every later start then waits for it
    forever. Wait while it is young enough for a build to hold it, then remove it."""
    lock = build_dir / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= stale_after_s:
            log.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
            lock.unlink(missing_ok=True)
            return
        time.sleep(1.0)


def main() -> None:
    """Build the kernels for this CPU ahead of the first start (`make setup`)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    if load() is not None:
        log.info("the C++ CPU kernels are built (%.0f s)", time.monotonic() - started)


def _cpu_description() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
