import os

# Several tests shard over a mesh of CPU devices; the flag must be set before
# JAX initializes its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import hypothesis
import numpy as np
import pytest

# jit compiles make the first example of a property slow; never time them out.
hypothesis.settings.register_profile("jaxmx", deadline=None, print_blob=True)
hypothesis.settings.load_profile("jaxmx")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
