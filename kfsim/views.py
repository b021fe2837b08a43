"""Text the CLI prints: the prediction table and the catalogue listings."""
from __future__ import annotations

import textwrap

from .fmt import scalar, si
from .inputs import Setup
from .power import has_model


#: columns of the printed prediction
WIDTH = 100


def _pct(part, whole) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "0%"


def predict_text(s: Setup, h: dict, out: dict) -> str:
    o = {k: scalar(v) for k, v in out.items()}
    w, hw = s.workload, s.hw
    step = o["step_ms"]
    lines = [
        f"{w.name} on {hw.name} ({hw.description})",
        engine_line(s),
        f"batch {h['batch']}, context {h['seq']} tokens, policy {s.policy.label()}, "
        f"weights {h['weight_dtype']}, KV {h['kv_dtype']}",
    ]
    lines += [f"note: {n}" for n in s.notes]
    if h["seq"] > w.max_context:
        lines.append(f"note: context {h['seq']} is beyond the model's trained context {w.max_context} "
                     f"(timing is extrapolated; the model was not trained for it)")
    parts = {"weights": o["weights_ms"], "KV": o["kv_ms"], "other memory": o["other_memory_ms"],
             "compute": o["compute_ms"], "fixed overhead": o["overhead_ms"]}
    if o["host_wait_ms"] > 0:
        parts["host wait"] = o["host_wait_ms"]
    if o["comm_ms"] > 0:
        parts["all-reduce"] = o["comm_ms"]
    cached = int(o["cached_tokens"])
    rows = [
        ("decode step", f"{step:.3f} ms   {o['tokens_per_s']:,.1f} tokens/s"),
        ("vs full cache", f"{o['full_step_ms']:.3f} ms  ->  {o['speedup_vs_full']:.2f}x "
                          + ("speedup" if o['speedup_vs_full'] >= 1 else "(slower)")
         if not s.policy.is_full else "this is the full cache"),
        *([("why slower", why_slower(o))] if not s.policy.is_full and o["speedup_vs_full"] < 1 else []),
        *([("largest batch", dividend(o))] if "full_max_batch" in o and s.policy.evicts else []),
        *([("tensor parallel", tp_text(s, h, o))] if h.get("tp", 1) > 1 else []),
        ("bound by", f"{BOUND_WORDS[o['bound']]}   (" + ", ".join(f"{k} {_pct(v, step)}" for k, v in parts.items())
         + ")"),
        ("bytes moved", f"weights {si(o['weight_bytes'], 'B')}, KV {si(o['kv_bytes'], 'B')} "
                        f"({cached:,} of {h['seq']:,} tokens x {h['batch']}), other {si(o['other_bytes'], 'B')}"),
        ("FLOPs", f"{si(o['flops'], 'FLOP')}; intensity {o['arithmetic_intensity']:.2f} FLOP/B (the GPU's ridge "
                  f"point: {o['ridge_point']:.0f} FLOP/B)"),
        ("bandwidth used", f"{o['achieved_bandwidth_gbps']:,.0f} GB/s of {hw.hbm_bandwidth_gbps:,.0f} GB/s "
                           f"datasheet ({_pct(o['achieved_bandwidth_gbps'], hw.hbm_bandwidth_gbps)})"),
        ("memory", f"{si(o['memory_bytes'], 'B')} of {si(o['memory_capacity_bytes'], 'B')}: "
                   f"{'fits' if o['fits'] else 'DOES NOT FIT'}; largest batch at this context {o['max_batch']:,}"),
        ("energy", f"{o['energy_per_token_j']:.3f} J/token at {o['board_power_w']:.0f} W "
                   + (f"(idle {hw.idle_w:g} W + {hw.pj_per_byte:g} pJ/byte + {hw.pj_per_flop:g} pJ/FLOP, fitted on "
                      f"measured power)" if has_model(hw) else
                      f"(TDP x {s.engine.power_fraction_of_tdp:g}: no power model measured for {hw.name})")),
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
    body = [textwrap.fill(v, WIDTH, initial_indent=f"{k.ljust(width)}  ", subsequent_indent=" " * (width + 2))
            for k, v in rows]
    head = [textwrap.fill(line, WIDTH, subsequent_indent="  ", break_on_hyphens=False) for line in lines]
    return "\n".join(head + [""] + body)


#: the step's largest share of time, in the words the table prints
BOUND_WORDS = {"memory": "memory traffic", "compute": "compute", "overhead": "fixed overhead (kernel launches)",
               "host": "host dispatch (the GPU waits for the CPU to launch kernels)",
               "communication": "communication (tensor-parallel all-reduces)"}


def engine_line(s: Setup) -> str:
    """Which engine answers, what it was fitted on, and whether this GPU is one it was measured on."""
    e = s.engine
    if not e.fitted_on:
        return f"engine {e.name}: {e.description or 'not fitted on measurements'}"
    note = "" if s.hw.name in e.fitted_gpus else "; extrapolated: not measured on this GPU"
    return f"engine {e.name}: fitted on {e.fitted_on}{note}"


def tp_text(s: Setup, h: dict, o: dict) -> str:
    """The all-reduces of a tensor-parallel step: their time, count and message."""
    from .parallel import ALLREDUCES_PER_LAYER, message_bytes

    message = float(message_bytes(s.workload, h["batch"], s.dtypes.compute.bytes))
    return (f"{h['tp']} GPUs split every layer: {o['comm_ms']:.3f} ms of all-reduces per step "
            f"({ALLREDUCES_PER_LAYER * s.workload.n_layers} of {si(message, 'B')}); memory below is per GPU")


def why_slower(o: dict) -> str:
    """In words, which terms a reducing policy grew more than its smaller cache saved."""
    saved = o["full_kv_ms"] - o["kv_ms"]
    grew = {"fixed overhead": o["overhead_ms"] - o["full_overhead_ms"],
            "other memory (scores, logits)": o["other_memory_ms"] - o["full_other_memory_ms"],
            "compute": o["compute_ms"] - o["full_compute_ms"],
            "host wait": o["host_wait_ms"] - o["full_host_wait_ms"]}
    grew = {k: v for k, v in sorted(grew.items(), key=lambda kv: -kv[1]) if v > 0.0005}
    extra = int(round(o["kernels"] - o["full_kernels"]))
    dispatched = int(round(o["host_ops"] - o["full_host_ops"]))
    parts = ", ".join(f"{k} +{v:.3f} ms" for k, v in grew.items())
    notes = [f"{extra:,} more kernels per step"] if extra > 0 else []
    if dispatched > 0 and dispatched != extra:  # an eager stack whose dispatched operations were counted
        notes.append(f"{dispatched:,} more operations dispatched")
    kernels = f" ({', '.join(notes)})" if notes else ""
    kv = (f"the smaller cache saves {saved:.3f} ms of KV reads" if saved >= 0 else
          f"the smaller cache's KV reads take {-saved:.3f} ms longer (its attention splits the cache less)")
    return (f"{kv}, but scoring adds {sum(grew.values()):.3f} ms: {parts}{kernels}; weights are "
            f"{_pct(o['weights_ms'], o['step_ms'])} of the step")


def dividend(o: dict) -> str:
    """The memory dividend: how many sequences fit at this context, and their tokens/s, against the full cache."""
    if not o["full_max_batch"]:
        full = "full cache does not fit"
    else:
        full = f"full cache {o['full_max_batch']:,} ({o['full_max_batch_tokens_per_s']:,.0f} tokens/s)"
    return f"{o['max_batch']:,} sequences ({o['max_batch_tokens_per_s']:,.0f} tokens/s) vs {full}"


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


def list_text(what: str) -> str:
    """`kfsim list` as a table within WIDTH columns: long cells are cut (`--json` has them whole); engines show
    what they were fitted on, or what they are where they were not fitted."""
    from .fmt import table

    header, rows = list_rows(what)
    header = [SHORT_HEADERS.get(h, h) for h in header]
    if what == "engines":
        header = header[:3] + ["fitted on (or what it is)"]
        rows = [r[:3] + [r[5] if r[4] == "-" else r[4]] for r in rows]
        room = WIDTH - len(table([r[:3] for r in rows], header[:3]).splitlines()[0]) - 2
        rows = [r[:3] + [r[3] if len(r[3]) <= room else r[3][:room - 3] + "..."] for r in rows]
    return table(rows, header)


#: `kfsim list` column names (the --json keys) shortened for the text table
SHORT_HEADERS = {"memory_gb": "GB", "bandwidth_gbps": "GB/s", "bf16_tflops": "bf16 TFLOP/s",
                 "fp8_tflops": "fp8 TFLOP/s", "kv_bytes_per_token": "KV B/token", "kv_heads": "kv heads",
                 "head_dim": "head dim"}
