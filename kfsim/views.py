"""Text the CLI prints: the prediction table and the catalogue listings."""
from __future__ import annotations

from .fmt import scalar, si
from .inputs import Setup


def _pct(part, whole) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "0%"


def predict_text(s: Setup, h: dict, out: dict) -> str:
    o = {k: scalar(v) for k, v in out.items()}
    w, hw = s.workload, s.hw
    step = o["step_ms"]
    lines = [
        f"{w.name} on {hw.name} ({hw.description}), engine {s.engine.name}",
        f"batch {h['batch']}, context {h['seq']} tokens, policy {s.policy.label()}, "
        f"weights {h['weight_dtype']}, KV {h['kv_dtype']}",
    ]
    if h["seq"] > w.max_context:
        lines.append(f"note: context {h['seq']} is beyond the model's trained context {w.max_context} "
                     f"(timing is extrapolated; the model was not trained for it)")
    parts = {"weights": o["weights_ms"], "KV": o["kv_ms"], "other memory": o["other_memory_ms"],
             "compute": o["compute_ms"], "fixed overhead": o["overhead_ms"]}
    cached = int(o["cached_tokens"])
    rows = [
        ("decode step", f"{step:.3f} ms   {o['tokens_per_s']:,.1f} tokens/s"),
        ("vs full cache", f"{o['full_step_ms']:.3f} ms  ->  {o['speedup_vs_full']:.2f}x speedup"
         if s.policy.evicts else "this is the full cache"),
        ("bound by", f"{o['bound']}   (" + ", ".join(f"{k} {_pct(v, step)}" for k, v in parts.items()) + ")"),
        ("bytes moved", f"weights {si(o['weight_bytes'], 'B')}, KV {si(o['kv_bytes'], 'B')} "
                        f"({cached:,} of {h['seq']:,} tokens x {h['batch']}), other {si(o['other_bytes'], 'B')}"),
        ("FLOPs", f"{si(o['flops'], 'FLOP')}; intensity {o['arithmetic_intensity']:.2f} FLOP/B vs ridge point "
                  f"{o['ridge_point']:.0f} FLOP/B ({'below: memory side' if o['arithmetic_intensity'] < o['ridge_point'] else 'above: compute side'})"),
        ("bandwidth used", f"{o['achieved_bandwidth_gbps']:,.0f} GB/s of {hw.hbm_bandwidth_gbps:,.0f} GB/s "
                           f"datasheet ({_pct(o['achieved_bandwidth_gbps'], hw.hbm_bandwidth_gbps)})"),
        ("memory", f"{si(o['memory_bytes'], 'B')} of {si(o['memory_capacity_bytes'], 'B')}: "
                   f"{'fits' if o['fits'] else 'DOES NOT FIT'}; largest batch at this context {o['max_batch']:,}"),
        ("energy", f"{o['energy_per_token_j']:.3f} J/token at {hw.tdp_w * s.engine.power_fraction_of_tdp:.0f} W "
                   f"(TDP x {s.engine.power_fraction_of_tdp:g})"),
    ]
    if "ttft_ms" in o:
        rows += [
            ("request", f"prompt {o['prompt_len']:,} + {o['gen_len']:,} generated tokens"),
            ("time to 1st token", f"{o['ttft_ms']:.1f} ms"),
            ("whole request", f"{o['total_ms']:.1f} ms ({o['request_tokens_per_s']:,.1f} generated tokens/s); "
                              f"{o['request_speedup_vs_full']:.2f}x vs full cache"),
            ("request memory", f"{si(o['request_memory_bytes'], 'B')} at peak: "
                               f"{'fits' if o['request_fits'] else 'DOES NOT FIT'}"),
        ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(lines + [""] + [f"{k.ljust(width)}  {v}" for k, v in rows])


def list_rows(what: str) -> tuple[list[str], list[list]]:
    from . import catalog

    if what == "gpus":
        from .hardware import get_hardware

        header = ["name", "aliases", "memory_gb", "bandwidth_gbps", "bf16_tflops", "fp8_tflops", "sms", "tdp_w"]
        rows = []
        for n in catalog.names("gpu"):
            h = get_hardware(n)
            p = h.peak_dense_tflops
            rows.append([h.name, ",".join(h.aliases), f"{h.memory_gb:g}", f"{h.hbm_bandwidth_gbps:g}",
                         f"{p['bf16'] or p['fp16']:g}" + ("" if p["bf16"] else " (fp16)"),
                         "-" if p["fp8"] is None else f"{p['fp8']:g}", str(h.sm_count), f"{h.tdp_w:g}"])
        return header, rows
    if what == "models":
        from .workload import get_workload

        header = ["name", "params", "layers", "d_model", "heads", "kv_heads", "head_dim", "ffn", "kv_bytes_per_token"]
        rows = []
        for n in catalog.names("model"):
            w = get_workload(n)
            rows.append([w.name, f"{w.n_params / 1e9:.2f}B", str(w.n_layers), str(w.d_model), str(w.n_heads),
                         str(w.n_kv_heads), str(w.head_dim), f"{w.ffn_dim} {w.ffn_type}",
                         f"{w.kv_bytes_per_token():,.0f}"])
        return header, rows
    from .engine import engine_names, get_engine

    header = ["name", "weight_bw", "kv_bw", "kernel_us", "fitted_on", "description"]
    rows = []
    for n in engine_names():
        e = get_engine(n)
        rows.append([e.name, f"{e.weight_bandwidth_fraction:.2f}", f"{e.kv_bandwidth_fraction:.2f}",
                     f"{e.kernel_overhead_us:g}", e.fitted_on or "-", e.description])
    return header, rows
