import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tiny models: one thread is steadier and faster than two fighting over 2 cores.
torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter):
    from tests import test_properties

    if test_properties.WORST:
        worst = ", ".join(f"{k} {v:.2e}" for k, v in sorted(test_properties.WORST.items()))
        terminalreporter.write_line(f"graddot vs single-sample loop, worst relative score error: {worst}")
