import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,  # the same examples every run
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    """Which CPU path this run takes (docs/which-cpu.md): torch's capability and the dtype `device` gives."""
    try:
        from ojbkq_core.precision import cpu_capability, resolve_dtype
    except ImportError:                       # an environment without the project (none here, but say so)
        return "ojbkq: not importable here"
    caps = cpu_capability()
    return (f"CPU: torch capability {caps['capability']}, avx512_bf16 {caps['avx512_bf16']}, amx {caps['amx']}; "
            f"model.dtype=device runs {resolve_dtype('device', 'cpu')} on the CPU")
