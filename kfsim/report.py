"""`kfsim report`: capacity-planning figures for one model on several GPUs, as PNGs with Markdown and a
self-contained HTML page (figures embedded, so it opens with no network). One idea per figure; units on every axis."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from .inputs import make_setup
from .ops import attended_tokens, decode_ops
from .predict import logit_passes_of, predict, step_time

CONTEXTS = np.unique(np.geomspace(256, 32768, 40).astype(int))
BATCHES = np.unique(np.geomspace(1, 512, 30).astype(int))
RATIOS = (1.0, 0.5, 0.2)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _setup(gpu, model, engine, ratio, tp=1):
    return make_setup(gpu=gpu, model=model, engine=engine, policy=None if ratio >= 1 else "keyformer",
                      kv_ratio=ratio, tp=tp)


def _label(ratio):
    return "full cache" if ratio >= 1 else f"Keyformer kv-ratio {ratio:g}"


def fig_roofline(ax, gpu, model, engine, batch, context, tp=1):
    """Each decode op at its arithmetic intensity and achieved FLOP/s, under the GPU's roofline."""
    s = _setup(gpu, model, engine, 1.0, tp)
    peak = s.hw.peak_flops(s.dtypes.compute)
    bw = s.hw.bandwidth_bytes_per_s
    x = np.geomspace(0.05, 2e4, 200)
    ax.plot(x, np.minimum(peak, x * bw) / 1e12, "k-", lw=1.2, label=f"{s.hw.name} roofline")
    for ratio, marker in ((1.0, "o"), (0.2, "^")):
        s = _setup(gpu, model, engine, ratio, tp)
        cached = attended_tokens(s.workload, s.policy, np.array(context))
        t = step_time(s, batch, cached)
        for op in decode_ops(s.workload, s.policy, s.dtypes, batch, cached):
            moved = float(op.weight_bytes + op.kv_read_bytes + op.kv_write_bytes + op.other_bytes
                          + logit_passes_of(s) * op.logit_pass_bytes)
            if moved <= 0 or float(op.flops) <= 0:
                continue
            ax.scatter(float(op.flops) / moved, float(op.flops) / float(t.per_op[op.name]) / 1e12, marker=marker,
                       s=30, alpha=0.8, label=None)
            if ratio == 1.0:
                ax.annotate(op.name, (float(op.flops) / moved, float(op.flops) / float(t.per_op[op.name]) / 1e12),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.scatter([], [], marker="o", color="grey", label="op, full cache")
    ax.scatter([], [], marker="^", color="grey", label="op, Keyformer 0.2")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP per byte moved)",
           ylabel="achieved TFLOP/s (engine " + s.engine.name + ")",
           title=f"Decode ops of {model} on {s.hw.name}, batch {batch}, context {context:,}")
    ax.legend(fontsize=7, loc="lower right")


def _fitting(out: dict, key: str) -> np.ndarray:
    """`out[key]` with the configurations that do not fit in memory blanked (NaN: not drawn)."""
    return np.where(out["fits"], out[key], np.nan)


def fig_latency_vs_context(axes, gpu, model, engine, batch, tp=1):
    for ratio in RATIOS:
        out = predict(_setup(gpu, model, engine, ratio, tp), batch, CONTEXTS)
        axes[0].plot(CONTEXTS, _fitting(out, "step_ms"), label=_label(ratio))
        axes[1].plot(CONTEXTS, _fitting(out, "tokens_per_s"), label=_label(ratio))
    axes[0].set(xscale="log", xlabel="context (tokens)", ylabel="decode step (ms)",
                title=f"{model} on {gpu}, batch {batch}: step latency")
    axes[1].set(xscale="log", xlabel="context (tokens)", ylabel="generated tokens/s",
                title=f"{model} on {gpu}, batch {batch}: throughput")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


def _colour(i):
    return _plt().rcParams["axes.prop_cycle"].by_key()["color"][i % 10]


def fig_max_batch(ax, gpus, model, engine, tp=1):
    """Colour = GPU, line style = KV budget."""
    for i, gpu in enumerate(gpus):
        for ratio, style in zip(RATIOS, ("-", "--", ":")):
            out = predict(_setup(gpu, model, engine, ratio, tp), 1, CONTEXTS)
            ax.plot(CONTEXTS, out["max_batch"], style, color=_colour(i), label=f"{gpu}, {_label(ratio)}")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="largest batch that fits (sequences)",
           title=f"{model}: sequences that fit in GPU memory\n(GPUs with equal memory draw on top of each other)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)


def fig_frontier(ax, gpus, model, engine, context, tp=1):
    """Colour = GPU, line style = KV budget; each line ends at the largest batch that fits."""
    for i, gpu in enumerate(gpus):
        for ratio, style in zip(RATIOS, ("-", "--", ":")):
            out = predict(_setup(gpu, model, engine, ratio, tp), BATCHES, context)
            fits = out["fits"]
            ax.plot(out["step_ms"][fits], out["tokens_per_s"][fits], style, marker=".", color=_colour(i),
                    label=f"{gpu}, {_label(ratio)}")
    ax.set(xscale="log", yscale="log", xlabel="decode step latency (ms), batch growing along each line",
           ylabel="generated tokens/s per GPU", title=f"{model}, context {context:,}: throughput vs latency over batch")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)


def fig_speedup(axes, gpu, model, engine, tp=1):
    for ratio in RATIOS[1:]:
        s = _setup(gpu, model, engine, ratio, tp)
        full = _setup(gpu, model, engine, 1.0, tp)
        for batch in (1, 16, 64):
            out = predict(s, batch, CONTEXTS)
            out["fits"] = predict(full, batch, CONTEXTS)["fits"]  # a speedup over a full cache that fits
            axes[0].plot(CONTEXTS, _fitting(out, "speedup_vs_full"), label=f"kv-ratio {ratio:g}, batch {batch}")
        for context in (2048, 8192):
            out = predict(s, BATCHES, context)
            out["fits"] = predict(full, BATCHES, context)["fits"]
            axes[1].plot(BATCHES, _fitting(out, "speedup_vs_full"), label=f"kv-ratio {ratio:g}, context {context:,}")
    for ax, x in zip(axes, ("context (tokens)", "batch (sequences)")):
        ax.axhline(1, color="k", lw=0.8)
        ax.set(xscale="log", xlabel=x, ylabel="Keyformer speedup over full cache (x)",
               title=f"{model} on {gpu}: speedup against {x.split()[0]}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)


def fig_bytes(ax, gpu, model, engine, batch, tp=1):
    labels, weights, kv, other = [], [], [], []
    for ratio in RATIOS:
        for context in (1024, 4096, 16384):
            out = predict(_setup(gpu, model, engine, ratio, tp), batch, context)
            if not out["fits"]:
                continue
            labels.append(f"{context // 1024}k\n{'full' if ratio >= 1 else f'KF {ratio:g}'}")
            weights.append(float(out["weight_bytes"]) / 1e9)
            kv.append(float(out["kv_bytes"]) / 1e9)
            other.append(float(out["other_bytes"]) / 1e9)
    x = np.arange(len(labels))
    ax.bar(x, weights, label="weights")
    ax.bar(x, kv, bottom=weights, label="KV cache")
    ax.bar(x, other, bottom=np.add(weights, kv), label="activations, scores, logits")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set(ylabel="bytes moved per decode step (GB)", xlabel="context and policy",
           title=f"{model} on {gpu}, batch {batch}: where the bytes go")
    ax.legend(fontsize=8)


#: requests simulated per load point, generated tokens per request, and load points of the serving figure
SERVING_REQUESTS, SERVING_GEN, SERVING_LOADS = 300, 256, np.linspace(0.1, 1.2, 8)


def fig_serving(axes, gpu, model, engine, prompt, tp=1):
    """p90 time to first token and time per output token against the request rate, per policy (kfsim simulate)."""
    from . import simulate as sim
    from .plan import best_batch

    for ratio in RATIOS:
        s = _setup(gpu, model, engine, ratio, tp)
        o = best_batch(s, prompt, SERVING_GEN, None)
        if not o.feasible:
            continue
        capacity = o.tokens_per_s_per_gpu * s.tp / SERVING_GEN  # requests/s of a steady batch
        cap = sim.batch_cap(s, prompt)
        times = sim.StepTimes(s, cap, prompt + SERVING_GEN, 2048)
        rates, ttft, tpot = [], [], []
        for load in SERVING_LOADS:
            req = sim.poisson_requests(load * capacity, SERVING_REQUESTS, str(prompt), str(SERVING_GEN))
            r = sim.simulate(times, req, cap, 2048)
            rates.append(load * capacity)
            ttft.append(np.percentile(r.ttft_s, 90) * 1e3)
            tpot.append(np.percentile(r.tpot_s, 90) * 1e3)
        axes[0].plot(rates, ttft, marker=".", label=_label(ratio))
        axes[1].plot(rates, tpot, marker=".", label=_label(ratio))
    for ax, what in zip(axes, ("p90 time to first token (ms)", "p90 time per output token (ms)")):
        ax.set(yscale="log", xlabel="request rate (requests/s, Poisson)", ylabel=what,
               title=f"{model} on {gpu}: {prompt:,} + {SERVING_GEN} tokens per request")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


def build(model: str, gpus: list[str], engine: str, out_dir: str | Path, batch: int = 16,
          context: int = 4096, tp: int = 1) -> Path:
    """Write the figures, report.md and report.html into `out_dir`; returns the HTML path."""
    from .files import staged_folder

    with staged_folder(out_dir) as stage:
        _write(stage, model, gpus, engine, batch, context, tp)
    return Path(out_dir) / "report.html"


def _write(out: Path, model: str, gpus: list[str], engine: str, batch: int, context: int, tp: int) -> None:
    """The figures, report.md and report.html into `out`."""
    plt = _plt()
    main = gpus[0]
    specs = [
        ("roofline", "The roofline and each decode op", (7, 5), 1,
         lambda a: fig_roofline(a[0], main, model, engine, batch, context, tp=tp),
         f"Each operation of one decode step ({model}, batch {batch}, context {context:,}) on {main}: ops far left "
         "of the ridge are limited by memory bandwidth, and the gap below the roofline is the engine's inefficiency."),
        ("latency_vs_context", "Step latency and tokens/s against context", (12, 4.2), 2,
         lambda a: fig_latency_vs_context(a, main, model, engine, batch, tp=tp),
         f"Decode-step time and generated tokens/s at batch {batch} on {main} as the context grows; a line stops "
         "where that configuration no longer fits in GPU memory."),
        ("max_batch", "Largest batch that fits", (7, 5), 1,
         lambda a: fig_max_batch(a[0], gpus, model, engine, tp=tp),
         "How many sequences fit in GPU memory beside the weights: a smaller KV budget holds more sequences at "
         "the same context, which is where Keyformer buys throughput in serving."),
        ("frontier", "Throughput-latency frontier over batch", (7, 5), 1,
         lambda a: fig_frontier(a[0], gpus, model, engine, context, tp=tp),
         f"Tokens/s per GPU against step latency as the batch grows at context {context:,}; each line ends at the "
         "largest batch that fits, so a line further up and right serves more within the same latency."),
        ("speedup", "Keyformer speedup against context and batch", (12, 4.2), 2,
         lambda a: fig_speedup(a, main, model, engine, tp=tp),
         f"Keyformer's decode-step speedup over the full cache on {main}, only where the full cache fits; below 1 "
         "the scorer's cost outweighs the KV bytes saved (small batch or short context, where weights dominate)."),
        ("serving", "Latency against load (simulated serving)", (12, 4.2), 2,
         lambda a: fig_serving(a, main, model, engine, context, tp=tp),
         f"kfsim simulate on {main}: continuous batching of {context:,}-token prompts and {SERVING_GEN} generated "
         f"tokens under Poisson arrivals, {SERVING_REQUESTS} requests a point. Latency climbs as the load nears "
         "what the deployment sustains; a smaller cache admits more requests at once and climbs later, unless its "
         "scorer costs more than it saves (as the plain decoder's, in the default engine, does)."),
        ("bytes", "Where the bytes go", (8, 4.5), 1,
         lambda a: fig_bytes(a[0], main, model, engine, batch, tp=tp),
         f"Bytes one decode step moves at batch {batch} on {main}, by kind (configurations that do not fit are "
         "left out): the KV share is what a smaller cache can save."),
    ]
    sections = []
    for name, title, size, n, draw, caption in specs:
        fig, axes = plt.subplots(1, n, figsize=size)
        draw(np.atleast_1d(axes))
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        sections.append((name, title, path, caption))
    split = f", tensor-parallel over {tp} GPUs (memory per GPU)" if tp > 1 else ""
    intro = (f"kfsim report for {model} on {', '.join(gpus)} (engine {engine}{split}); figures use batch {batch} "
             f"and context {context:,} where one value is needed. Keyformer keeps kv-ratio x context tokens.")
    md = [f"# {model}: capacity planning", "", intro, ""]
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>kfsim: {html.escape(model)}</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}img{max-width:100%}</style></head>"
            f"<body><h1>{html.escape(model)}: capacity planning</h1><p>{html.escape(intro)}</p>"]
    for name, title, path, caption in sections:
        md += [f"## {title}", "", f"![{title}]({path.name})", "", caption, ""]
        data = base64.b64encode(path.read_bytes()).decode()
        page.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
                    f"<p>{html.escape(caption)}</p>")
    page.append("</body></html>")
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    (out / "report.html").write_text("\n".join(page), encoding="utf-8")
