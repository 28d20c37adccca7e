import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tiny models: one thread is steadier and faster than two fighting over 2 cores.
torch.set_num_threads(1)

# Forward-mode AD's first use anywhere (torch.func.jvp or forward_ad inside a test's model) imports torch's jvp
# decompositions, which warns that torch.jit.script is deprecated (torch's own code; warnings are errors here): once,
# silenced, whichever test comes first (a test selected alone failed on it).
from ghostfunc._shapley import _import_jvp_decompositions  # noqa: E402

_import_jvp_decompositions()


def pytest_terminal_summary(terminalreporter):
    import sys

    # only the modules this run collected (test_hf needs transformers)
    test_properties, test_hf = (sys.modules.get(f"tests.{m}") for m in ("test_properties", "test_hf"))
    if test_properties is not None and test_properties.WORST:
        worst = ", ".join(f"{k} {v:.2e}" for k, v in sorted(test_properties.WORST.items()))
        terminalreporter.write_line(f"graddot vs single-sample loop, worst relative score error: {worst}")
    # the model classes of the reliability issue: worst float64 error over every policy and val_reduce
    for module, what in (("test_reliability", "silent-wrong-number classes"),
                         ("test_reliability_models", "branching and untransformable models")):
        found = sys.modules.get(f"tests.{module}")
        if found is not None and found.WORST:
            worst = max(found.WORST.items(), key=lambda kv: kv[1])
            terminalreporter.write_line(f"{what} vs single-sample loop ({len(found.WORST)} families): worst relative "
                                        f"error {worst[1]:.2e} ({worst[0]})")
    # per Hugging Face family: the worst over its attention kernels, per dtype
    if test_hf is not None and any(case.endswith("float64") for _, case in test_hf.WORST):
        per: dict[str, dict[str, float]] = {}
        for (family, case), err in test_hf.WORST.items():
            dtype = case.split()[-1]
            if dtype not in ("float32", "float64"):  # LoRA, low precision, ...: their own tests and tolerances
                continue
            per.setdefault(family, {})[dtype] = max(per.get(family, {}).get(dtype, 0.0), err)
        terminalreporter.write_line("Hugging Face families vs single-sample loop, worst relative score error:")
        for family, errs in per.items():
            line = ", ".join(f"{d} {e:.1e}" for d, e in sorted(errs.items()))
            fallback = ", ".join(sorted(test_hf.FALLBACK[family])) or "none"
            terminalreporter.write_line(f"  {family}: {line}; parameters on the fallback: {fallback}")
