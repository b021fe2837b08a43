"""Every shipped file loads, names its file, sources its figures."""
import pytest

from kfsim import catalog
from kfsim.engine import get_engine
from kfsim.hardware import FIGURES, get_hardware
from kfsim.workload import get_workload

REQUIRED_GPUS = ["a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "l40s", "l4", "a10g", "v100", "b200",
                 "mi300x"]
REQUIRED_MODELS = ["gpt-j-6b", "cerebras-gpt-111m", "cerebras-gpt-256m", "cerebras-gpt-590m", "cerebras-gpt-1.3b",
                   "cerebras-gpt-2.7b", "cerebras-gpt-6.7b", "cerebras-gpt-13b", "mpt-7b", "mpt-30b", "llama-2-7b",
                   "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b"]


def test_required_profiles_ship():
    assert set(REQUIRED_GPUS) <= set(catalog.names("gpu"))
    assert set(REQUIRED_MODELS) <= set(catalog.names("model"))
    assert get_hardware("a100").name == "a100-80gb"
    assert get_hardware("h100").name == "h100-sxm"


@pytest.mark.parametrize("name", catalog.names("gpu"))
def test_gpu_profile_sourced(name):
    hw = get_hardware(name)
    for figure in FIGURES:
        if getattr(hw, figure) is not None:
            assert hw.source[figure].strip(), figure


@pytest.mark.parametrize("name", catalog.names("model"))
def test_workload_loads(name):
    w = get_workload(name)
    assert w.name == name and w.source["architecture"]
    assert w.n_heads % w.n_kv_heads == 0


@pytest.mark.parametrize("name", catalog.names("engine"))
def test_engine_loads(name):
    assert get_engine(name).name == name


@pytest.mark.parametrize("kind", ["gpu", "model", "engine"])
def test_aliases_unique(kind):
    import yaml

    seen = {}
    for name, path in catalog.shipped_files(kind).items():
        for alias in [name] + list(yaml.safe_load(path.read_text()).get("aliases", [])):
            assert alias not in seen, f"{alias} in {name} and {seen.get(alias)}"
            seen[alias] = name


def test_parameter_counts_match_reference():
    # ../shared/reference/hardware_and_models.md model table: approximate published sizes
    approx = {"llama-2-7b": 6.74e9, "llama-2-13b": 13.0e9, "llama-2-70b": 69.0e9, "llama-3-70b": 70.6e9,
              "mistral-7b": 7.24e9, "mpt-7b": 6.65e9, "cerebras-gpt-13b": 12.9e9, "cerebras-gpt-111m": 111e6}
    for name, n in approx.items():
        assert get_workload(name).n_params == pytest.approx(n, rel=0.03), name
