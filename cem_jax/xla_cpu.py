"""XLA:CPU flags the package's steps run faster with, added to ``XLA_FLAGS`` when ``cem_jax`` is imported,
and the host allocator setting its programs run with (:func:`tune_malloc`).

XLA reads ``XLA_FLAGS`` once, when its first backend starts, so they are set on ``import cem_jax``
(before any computation) and only where the user has not set the same flag. The one flag today:

* ``--xla_cpu_experimental_ynn_fusion_type=dot,reduce``: lets XLA:CPU hand matmuls and
  reductions to YNNPACK (its default list is empty in jaxlib 0.10). On the 2-core CI CPU the
  decoder attack step (batch 256, ``python -m benchmarks.attack_step``) ran at 157 images/s with
  ``dot`` alone, 173 with ``dot,reduce``, PyTorch's same step at 211-221 in the same runs; the
  flag changes no function, only how XLA schedules the same operations (``tests/test_xla_cpu.py``
  compares a decoder step and a client step with and without it).

  ``eltwise`` is left out on purpose although it adds ~4 % more (180 images/s): in jaxlib 0.10.2
  an elementwise fusion that reads a column-major array, such as ``jnp.linalg.cholesky(a) * 2`` or
  the eigenvalues of ``jnp.linalg.eigh``, fails with ``Instruction with unsupported layout in YNN
  fusion``, which broke the full-covariance leakage bound and would break any user's program that
  imports ``cem_jax``. A user who needs neither can set the flag with ``eltwise`` themselves.

The flags are added only for the jaxlib versions they were measured on (:data:`TESTED_JAXLIB`):
an unknown flag is a fatal error in XLA, so a newer jaxlib gets none of them. Set
``CEM_JAX_XLA_CPU_FLAGS=0`` to leave ``XLA_FLAGS`` alone. The flags only concern XLA's CPU backend;
GPU and TPU computations are unaffected.

**The allocator** (:func:`tune_malloc`, called by every ``experiments`` / ``cem-*`` program and the
speed benchmarks before XLA starts; ``CEM_JAX_MALLOC=0`` leaves it alone). XLA:CPU allocates each
call's temporary buffer (all of a step's intermediates: 214 MB for the decoder attack step at batch
64) with ``posix_memalign`` on one of its worker threads. glibc serves a block that large from a
fresh ``mmap`` in a thread's arena (whatever ``M_MMAP_MAX`` says) and unmaps it on ``free``, so
every step faults its whole working set back in, page by page, each page zeroed by the kernel:
52,500 minor page faults per attack step at batch 64, 3-5.5 s of system time in 18-30 steps. With
one arena (``M_ARENA_MAX`` 1), no ``mmap``'d blocks (``M_MMAP_MAX`` 0) and the heap's top kept
(``M_TRIM_THRESHOLD`` 2 GiB), the freed buffer is reused: 3,500-5,700 faults per step, 0.3-0.7 s of
system time, the step alone ~30 % faster (the ``mmap`` options without the single arena change
nothing for XLA). The price: the process keeps its peak heap (0.85 -> 1.24 GB peak RSS there).
Only glibc on Linux has these knobs; elsewhere nothing is set. Figures: ``docs/benchmarks.md``.

>>> recommended_xla_flags("--xla_force_host_platform_device_count=8", "0.10.2")
'--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot,reduce'
>>> recommended_xla_flags("--xla_cpu_experimental_ynn_fusion_type=dot", "0.10.2")  # the user's wins
'--xla_cpu_experimental_ynn_fusion_type=dot'
>>> recommended_xla_flags("", "0.11.0")  # not measured there: nothing added
''
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping, MutableMapping
from importlib import metadata

#: flag name -> value added to ``XLA_FLAGS``.
FLAGS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": "dot,reduce"}
#: jaxlib version prefixes the flags were measured on (and that know them).
TESTED_JAXLIB: tuple[str, ...] = ("0.10.",)
#: Environment variable that turns the flags off (``0``).
OPT_OUT = "CEM_JAX_XLA_CPU_FLAGS"


def recommended_xla_flags(xla_flags: str, jaxlib_version: str | None) -> str:
    """``xla_flags`` with every flag of :data:`FLAGS` it does not set already appended (none when
    ``jaxlib_version`` is not one of :data:`TESTED_JAXLIB`)."""
    if jaxlib_version is None or not jaxlib_version.startswith(TESTED_JAXLIB):
        return xla_flags
    given = {tok.lstrip("-").split("=", 1)[0] for tok in xla_flags.split()}
    extra = [f"--{name}={value}" for name, value in FLAGS.items() if name not in given]
    return " ".join([xla_flags.strip(), *extra]).strip()


def _jaxlib_version() -> str | None:
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None


def apply(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Adds the recommended flags to ``environ['XLA_FLAGS']`` (default ``os.environ``) unless
    ``CEM_JAX_XLA_CPU_FLAGS=0``; returns the flags added. Has an effect only before XLA starts."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip() == "0":
        return []
    old = env.get("XLA_FLAGS", "")
    new = recommended_xla_flags(old, _jaxlib_version())
    if new != old:
        env["XLA_FLAGS"] = new
    return new.split()[len(old.split()) :]


#: glibc ``mallopt`` parameter (``<malloc.h>``) -> value, set by :func:`tune_malloc` in this order.
MALLOC_SETTINGS: dict[str, tuple[int, int]] = {
    "M_ARENA_MAX": (-8, 1),
    "M_MMAP_MAX": (-4, 0),
    "M_TRIM_THRESHOLD": (-1, 2**31 - 1),
}
#: Environment variable that leaves the allocator alone (``0``).
MALLOC_OPT_OUT = "CEM_JAX_MALLOC"


def tune_malloc(environ: Mapping[str, str] | None = None) -> list[str]:
    """Sets :data:`MALLOC_SETTINGS` with glibc's ``mallopt`` unless ``CEM_JAX_MALLOC=0`` or the C
    library is not glibc; returns the names of the settings that took (empty when none did).

    Call it before the first computation: a thread that has already allocated keeps its own arena,
    whose large blocks stay ``mmap``'d. The module docstring says why and what it costs."""
    env = os.environ if environ is None else environ
    if env.get(MALLOC_OPT_OUT, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return []
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return []
    # glibc only (gnu_get_libc_version): musl's mallopt is a stub that sets nothing
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return []
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return [name for name, (param, value) in MALLOC_SETTINGS.items() if mallopt(param, value) == 1]
