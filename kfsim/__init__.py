"""kfsim: a performance model of LLM decoding with KV-cache reduction (Keyformer), checked against measurements.

The core (this package) imports numpy, yaml and click only; torch and NVML are for `measure/`.
"""
__version__ = "0.1.0"
