import os

# Several tests shard over a mesh of CPU devices; the flag must be set before
# JAX initializes its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import hypothesis
import numpy as np
import pytest

# jit compiles make the first example of a property slow; never time them out.
hypothesis.settings.register_profile("jaxmx", deadline=None, print_blob=True)
# JAXMX_FUZZ=large: a long fuzzing run, ten times the examples of every
# property (tests/test_fuzz.py scales its per-test counts by the same factor).
hypothesis.settings.register_profile(
    "jaxmx-large", parent=hypothesis.settings.get_profile("jaxmx"), max_examples=1000
)
_FUZZ_PROFILES = {"": "jaxmx", "default": "jaxmx", "large": "jaxmx-large"}
_fuzz = os.environ.get("JAXMX_FUZZ", "")
if _fuzz not in _FUZZ_PROFILES:
    raise ValueError(f"JAXMX_FUZZ={_fuzz!r} is not a profile; allowed: default, large")
hypothesis.settings.load_profile(_FUZZ_PROFILES[_fuzz])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Each test module's compiled programs are dropped when it ends, so a
    worker's memory holds one module's programs, not every module's
    (JAXMX_TEST_KEEP_CACHES=1 keeps them, to compare; docs/development.md)."""
    yield
    if os.environ.get("JAXMX_TEST_KEEP_CACHES") != "1":
        import jax

        jax.clear_caches()


# JAXMX_TEST_COMPILE_CACHE=DIR: keep compiled programs on disk in DIR (JAX's
# persistent compilation cache, every program however quick to compile), so a
# second run of the same tests on this machine skips XLA compilation.
_COMPILE_CACHE = os.environ.get("JAXMX_TEST_COMPILE_CACHE")
if _COMPILE_CACHE:
    import jax

    jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
