"""The `kfsim` command: parse flags, call the model, format the answer. No model logic lives here."""
from __future__ import annotations

import math
import sys

import click

from .errors import KfsimError, first_line


class _Group(click.Group):
    """Turns user errors (ours and click's) into one line `Error: ...` with exit status 2, no usage dump."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except KfsimError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(0)


class _Finite(click.FloatRange):
    """A finite number in a range (click's FloatRange lets NaN through: every comparison with NaN is false)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; allowed: a finite number {self._describe_range()}",
                      param, ctx)
        return number


POSITIVE = _Finite(min=0, min_open=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="kfsim")
def cli():
    """kfsim: predict LLM decode latency, throughput, memory and energy on a GPU, with and without Keyformer
    KV-cache reduction.

    \b
    First prediction:   kfsim predict --gpu a100 --seq 4096 --kv-ratio 0.5
    What ships:         kfsim list gpus | models | engines
    """


def _read_profile(path, measured_engine, rows):
    """A profile file's steps for these rows: of --measured-engine, else of the rows' one measured engine."""
    from .breakdown import read_profile

    if measured_engine is None and "engine" in rows.columns and rows["engine"].nunique() == 1:
        measured_engine = str(rows["engine"].iloc[0])
    return read_profile(path, measured_engine)


def _need(command: str, *modules: str) -> None:
    """A one-line error naming the extra to install when an optional package is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise KfsimError(f"kfsim {command} needs {', '.join(missing)}: pip install -e '.[analysis]'")


def _ratio(ctx, param, value):
    if value is not None and not (0 < value <= 1):  # NaN fails this too
        shown = f"{value:g}" if float(f"{value:g}") == value else repr(value)  # 0, not 0.0; 1.0000001, not 1
        raise click.BadParameter(f"{shown} is out of range; allowed: 0 < value <= 1")
    return value


#: the most microseconds --host-launch-us takes: a tiny CUDA launch costs 5-11 us on the hosts measured here
#: (host_launch_us in data/*-hf-eager), so a thousand is a typo, not a host
MAX_LAUNCH_US = 1000.0


def _launch_us(ctx, param, value):
    if value is not None and not (0 < value <= MAX_LAUNCH_US):  # NaN and inf fail this too
        raise click.BadParameter(f"{value:g} is out of range; allowed: 0 < US <= {MAX_LAUNCH_US:g} (microseconds "
                                 f"to launch one CUDA op)")
    return value


@cli.command()
@click.option("--gpu", "gpu", metavar="NAME", help="Shipped GPU profile or alias (see `kfsim list gpus`).")
@click.option("--hw", "hw_file", metavar="FILE", help="A GPU profile YAML file instead of --gpu.")
@click.option("--model", "model", metavar="NAME", help="Shipped model (see `kfsim list models`). [default: gpt-j-6b]")
@click.option("--workload", "workload_file", metavar="FILE", help="A workload YAML file instead of --model.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Sequences decoded together.")
@click.option("--seq", type=click.IntRange(min=1), metavar="N",
              help="Context length at the decode step: tokens a full cache holds. [default: prompt + gen length "
                   "when a request is given]")
@click.option("--kv-ratio", type=float, default=1.0, show_default=True, callback=_ratio,
              help="Fraction of the context the KV cache keeps (0 < R <= 1).")
@click.option("--policy", type=click.Choice(["full", "keyformer", "h2o", "window"]),
              help="KV policy. [default: keyformer when --kv-ratio < 1, else full]")
@click.option("--window", type=float, default=0.3, show_default=True, callback=_ratio,
              help="Keyformer/H2O recent window as a fraction of the budget (authors' default 0.3).")
@click.option("--engine", default="default", show_default=True, metavar="NAME|FILE",
              help="Software efficiency: `ideal` (pure roofline), a shipped engine or a fitted YAML file.")
@click.option("--dtype", "weight_dtype", metavar="D", help="Weight dtype: fp32, bf16, fp16, fp8, int8, int4 (groups of 32 with an fp16 scale and zero: 5 bits a weight), int4-g128 (4.25 bits). "
              "[default: the model's]")
@click.option("--kv-dtype", metavar="D", help="KV-cache dtype: fp32, bf16, fp16, fp8, int8, int4, int4-g128. [default: the model's]")
@click.option("--prompt-len", type=click.IntRange(min=1, max=10_000_000), metavar="P",
              help="Prompt tokens of a whole request.")
@click.option("--gen-len", type=click.IntRange(min=1, max=1_000_000), metavar="G",
              help="Generated tokens of a whole request (priced step by step).")
@click.option("--scenario", metavar="NAME", help="A model's preset prompt/gen lengths (e.g. summarization).")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Tensor-parallel GPUs splitting every layer (1, 2, 4, 8); memory and fit are per GPU.")
@click.option("--host-launch-us", type=float, callback=_launch_us, metavar="US",
              help="Your host's microseconds to launch one tiny CUDA op (kfsim measure records it in each row as "
                   "host_launch_us): an eager engine's host time scales from the host it was fitted on. "
                   "[default: that host's]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def predict(gpu, hw_file, model, workload_file, batch, seq, kv_ratio, policy, window, engine, weight_dtype, kv_dtype,
            prompt_len, gen_len, scenario, tp, host_launch_us, as_json):
    """Predict one decode step (and, with --prompt-len/--gen-len, a whole request).

    \b
    Example: kfsim predict --gpu a100 --seq 4096 --kv-ratio 0.5
    """
    from . import fmt
    from .views import predict_text
    from .inputs import make_setup

    s = make_setup(gpu=gpu, hw_file=hw_file, model=model, workload_file=workload_file, engine=engine,
                   policy=policy, kv_ratio=kv_ratio, window=window, weight_dtype=weight_dtype, kv_dtype=kv_dtype, tp=tp)
    s = _on_host(s, host_launch_us)
    if scenario:
        if prompt_len or gen_len:
            raise KfsimError("give either --scenario or --prompt-len/--gen-len, not both")
        sc = s.workload.scenario(scenario)
        prompt_len, gen_len = sc.prompt_len, sc.gen_len
    if (prompt_len is None) != (gen_len is None):
        raise KfsimError("a request needs both --prompt-len and --gen-len")
    if seq is None:
        if prompt_len is None:
            raise KfsimError("give --seq N (context length at the decode step), or a request with "
                             "--prompt-len/--gen-len or --scenario")
        seq = prompt_len + gen_len - 1
    from .predict import predict as run

    if prompt_len is not None:
        s = s.with_requests(prompt_len)
    out = run(s, batch, seq, prompt_len, gen_len)
    if s.policy.evicts:
        from .predict import largest_batch

        out.update(largest_batch(s, seq))
    header = {"gpu": s.hw.name, "model": s.workload.name, "engine": s.engine.name, "policy": "full"
              if s.policy.is_full else s.policy.kind, "kv_ratio": s.policy.kv_ratio, "window": s.policy.window,
              "batch": batch, "seq": seq, "weight_dtype": str(s.dtypes.weight), "kv_dtype": str(s.dtypes.kv),
              "tp": tp, "host_launch_us": s.host_launch_us or s.engine.host_launch_us, "notes": list(s.notes)}
    if as_json:
        click.echo(fmt.to_json({**header, **out}))
    else:
        click.echo(predict_text(s, header, out))


def _on_host(s, host_launch_us):
    """The setup on the user's host (--host-launch-us), with a note wherever the engine's host terms apply."""
    import dataclasses

    ref = s.engine.host_launch_us
    if host_launch_us is None:
        if not ref:
            return s
        note = (f"host: as fast as the one engine {s.engine.name} was fitted on ({ref:g} us to launch a CUDA op); "
                f"give yours with --host-launch-us")
        return dataclasses.replace(s, notes=s.notes + (note,))
    if not ref:
        raise KfsimError(f"--host-launch-us {host_launch_us:g}: engine {s.engine.name} has no host terms fitted at a "
                         f"measured launch cost (an eager engine fitted on rows with host_launch_us, e.g. hf-eager)")
    note = (f"host: {host_launch_us:g} us to launch a CUDA op against {ref:g} on the host engine {s.engine.name} "
            f"was fitted on: its host time x{host_launch_us / ref:.2f}")
    return dataclasses.replace(s, host_launch_us=float(host_launch_us), notes=s.notes + (note,))


@cli.command(name="list")
@click.argument("what", type=click.Choice(["gpus", "models", "engines"]))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of the table.")
def list_cmd(what, as_json):
    """Show the shipped GPU profiles, models or engines."""
    from .views import list_rows

    header, rows = list_rows(what)
    if as_json:
        import json

        click.echo(json.dumps([dict(zip(header, r)) for r in rows], indent=2))
    else:
        from .views import list_text

        click.echo(list_text(what))


def _tp_gpus(tp: int, what: str):
    """torch, once `what` with --tp `tp` can run here: torch installed, a CUDA GPU per rank (one-line errors)."""
    try:
        import torch
    except ImportError:
        raise KfsimError(f"kfsim {what} needs torch: pip install -e '.[measure]'") from None
    if not torch.cuda.is_available():
        raise KfsimError(f"kfsim {what} needs a CUDA GPU and none is visible (torch.cuda.is_available() is False)")
    if tp > 1 and torch.cuda.device_count() < tp:
        raise KfsimError(f"--tp {tp}: {torch.cuda.device_count()} CUDA GPU(s) visible; one per rank is needed")
    return torch


_TP_DEGREE = click.Choice(["1", "2", "4", "8"])


@cli.command()
@click.option("--model", default="gpt-j-6b", show_default=True, metavar="M[,M...]", help="Models to measure.")
@click.option("--batch", default="1", show_default=True, metavar="LIST", help="Batch sizes, e.g. 1,8,32.")
@click.option("--context", default="1024", show_default=True, metavar="LIST",
              help="Context lengths at the decode step (tokens a full cache holds), e.g. 1024,4096.")
@click.option("--kv-ratio", default="1", show_default=True, metavar="LIST",
              help="KV budgets as fractions of the context; full runs at 1, the other policies below 1.")
@click.option("--policy", default="full", show_default=True, metavar="LIST",
              help="KV policies: full, keyformer, h2o, window.")
@click.option("--window", type=float, default=0.3, show_default=True, callback=_ratio,
              help="Recent window as a fraction of the budget.")
@click.option("--steps", type=click.IntRange(min=5), default=50, show_default=True, help="Timed steps per point.")
@click.option("--warmup", type=click.IntRange(min=1), default=10, show_default=True, help="Untimed steps first.")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Time each point this many times, each round over all of a model's points in a shuffled order, "
                   "and keep the fastest round's median (eager steps, bound by a host whose speed drifts for "
                   "seconds at a time); rows record every round's median in round_ms.")
@click.option("--eager", is_flag=True, help="Launch kernels one by one instead of replaying a CUDA graph.")
@click.option("--engine", "engine", type=click.Choice(["torch-graph", "compiled"]), default="torch-graph",
              show_default=True, help="torch-graph: the plain decoder in a CUDA graph; compiled: torch.compile "
              "glue, fused matrix-vector products at batch 1-16 and fused split-K Triton attention with "
              "Keyformer scoring and ALiBi, in a CUDA graph (rows list its kernel's features in kernel_options: "
              "measure/kernel_options.py).")
@click.option("--backend", type=click.Choice(["kfsim", "hf"]), default="kfsim", show_default=True,
              help="Whose decoder: kfsim's own (--engine), or Hugging Face transformers' model classes and caches "
                   "(hf: rows with engine hf-eager or hf-compiled; Keyformer as measure.hf.KeyformerCache).")
@click.option("--hf-mode", type=click.Choice(["eager", "compiled"]), default="eager", show_default=True,
              help="--backend hf: eager PyTorch with the dynamic cache, or under torch.compile with the static "
                   "cache (full) or KeyformerCache (keyformer, h2o below kv-ratio 1).")
@click.option("--checkpoint", metavar="DIR", help="--backend hf: a local model folder to load instead of random "
              "weights of the --model's shape (timing does not depend on weight values).")
@click.option("--prefill", "prefill_prompts", default="", metavar="LIST",
              help="Also time prefill at these prompt lengths (batch from --prefill-batch).")
@click.option("--prefill-batch", default="1", show_default=True, metavar="LIST", help="Batch sizes for prefill.")
@click.option("--out", required=True, metavar="FILE", help="Measurement CSV; rows are appended point by point.")
@click.option("--no-resume", is_flag=True, help="Measure every point even if --out already has it.")
@click.option("--profile", is_flag=True,
              help="Also profile each decode point's step by operation group (projections, attention, keyformer, "
                   "ffn, norms, positional, lm_head, other, gaps: eager steps under the PyTorch profiler) into "
                   "OUT-profile.csv, which kfsim validate --profile compares with the model's groups. The plain "
                   "decoder, or --backend hf --hf-mode eager, on one GPU.")
@click.option("--tp", type=_TP_DEGREE, default="1", show_default=True,
              help="GPUs of this host to split the plain decoder over (tensor parallelism, Megatron-style, NCCL): "
                   "rows record tp, and a step is the slowest GPU's. Decode points only; power is not read. "
                   "Launched here, or by torchrun with --nproc-per-node N.")
def measure(model, batch, context, kv_ratio, policy, window, steps, warmup, rounds, eager, engine,
            backend, hf_mode, checkpoint, prefill_prompts, prefill_batch, out, no_resume, profile, tp):
    """Time real decoding on this machine's CUDA GPU and append rows to a measurement CSV.

    \b
    Example: kfsim measure --model gpt-j-6b,llama-3-8b --batch 1,8,32 --context 1024,4096
             --kv-ratio 1,0.5,0.2 --policy full,keyformer --out results.csv
    """
    from .catalog import names
    from .values import parse_list

    models = parse_list(model, "model", choices=tuple(names("model")))
    batches = parse_list(batch, "batch", int, lo=1)
    contexts = parse_list(context, "context", int, lo=1)
    ratios = parse_list(kv_ratio, "kv-ratio", float, lo=1e-6, hi=1)
    policies = parse_list(policy, "policy", choices=("full", "keyformer", "h2o", "window"))
    prompts = parse_list(prefill_prompts, "prefill", int, lo=1) if prefill_prompts else []
    prefill_batches = parse_list(prefill_batch, "prefill-batch", int, lo=1)
    from .policy import measured_pairs

    if not measured_pairs(policies, ratios):
        raise KfsimError("no points to measure: full runs only at --kv-ratio 1, other policies only below 1")
    if eager and engine != "torch-graph":
        raise KfsimError("--eager runs the plain decoder launch by launch; it does not combine with --engine compiled")
    if backend == "hf" and (eager or engine != "torch-graph"):
        raise KfsimError("--eager and --engine choose kfsim's own decoder; with --backend hf use "
                         "--hf-mode eager|compiled")
    tp = int(tp)
    if profile and (engine != "torch-graph" or tp > 1 or (backend == "hf" and hf_mode != "eager")):
        raise KfsimError("--profile breaks down eager steps on one GPU, of the plain decoder (--engine torch-graph, "
                         "or --eager) or of transformers (--backend hf --hf-mode eager): it does not combine with "
                         "--engine compiled, --hf-mode compiled or --tp")
    if tp > 1 and rounds > 1:
        raise KfsimError(f"--rounds {rounds} times one GPU's points round by round: it does not combine with --tp")
    if tp > 1 and (backend != "kfsim" or engine != "torch-graph" or prompts):
        raise KfsimError(f"--tp {tp} splits kfsim's plain decoder (--engine torch-graph, or --eager) over GPUs and "
                         "times decode steps: it does not combine with --backend hf, --engine compiled or --prefill")
    if tp > 1:
        from .parallel import check_tp
        from .workload import get_workload

        for name in models:
            check_tp(get_workload(name), tp)
    if backend != "hf" and (hf_mode != "eager" or checkpoint is not None):
        raise KfsimError("--hf-mode and --checkpoint are options of --backend hf")
    if checkpoint is not None:
        from pathlib import Path

        if not checkpoint or not Path(checkpoint).is_dir():
            raise KfsimError(f"--checkpoint {checkpoint!r}: not a folder (a local transformers model folder)")
    _tp_gpus(tp, "measure")
    import importlib.util

    if engine == "compiled" and importlib.util.find_spec("triton") is None:
        raise KfsimError("kfsim measure --engine compiled needs triton (its attention kernels are Triton); "
                         "torch's CUDA wheels bring it")
    from measure import campaign

    points = campaign.grid(models, batches, contexts, ratios, policies, prompts, prefill_batches)
    if tp > 1:
        from measure import tp_campaign

        click.echo(f"measuring {len(points)} points split over {tp} GPUs -> {out}", err=True)
        try:
            tp_campaign.run(points, out, tp, steps=steps, warmup=warmup, graph=not eager, window=window,
                            resume=not no_resume)
        except RuntimeError as exc:  # a rank failed: its own traceback is above
            raise KfsimError(f"{exc}; the rows measured so far are in {out}") from None
        return
    if backend == "hf":
        from measure import hf_campaign

        hf_campaign.check_installed()
        runner = hf_campaign.HfRunner(mode=hf_mode, checkpoint=checkpoint, steps=steps, warmup=warmup, window=window,
                                      profile=profile)
    else:
        runner = campaign.Runner(steps=steps, warmup=warmup, window=window,
                                 engine="torch-eager" if eager else engine, profile=profile)
    click.echo(f"measuring {len(points)} points on {runner.env['gpu_name']} ({runner.env['gpu']}) -> {out}", err=True)
    rows = campaign.run(points, out, runner, resume=not no_resume, echo=lambda m: click.echo(m, err=True),
                        rounds=rounds)
    from .fmt import table

    click.echo(table([[r["model"], r["phase"], str(r["batch"]), str(r["context"]), r["policy"], f"{r['kv_ratio']:g}",
                       f"{r['step_ms']:.3f}" if r["status"] == "ok" else r["status"]] for r in rows],
                     ["model", "phase", "batch", "context", "policy", "kv_ratio", "step_ms"]) if rows else
               "nothing new measured")




@cli.command()
@click.option("--out", required=True, metavar="FILE", help="CSV for the microbenchmark rows.")
@click.option("--tp", type=_TP_DEGREE, default="1", show_default=True,
              help="GPUs: 1 times this GPU's memory, GEMMs, launches and attention; N > 1 times all-reduces over N "
                   "GPUs of this host instead (NCCL; 8 KB-256 MB, the figures kfsim calibrate fits the interconnect "
                   "terms from). Launched here, or by torchrun with --nproc-per-node N.")
def microbench(out, tp):
    """HBM read/copy bandwidth, GEMM and skinny-GEMM rates, kernel launch cost, decode attention, on this GPU;
    or with --tp N, all-reduce latency and bus bandwidth over N GPUs."""
    tp = int(tp)
    _tp_gpus(tp, "microbench")
    from .files import output_path
    from .fmt import table

    output_path(out, "out")
    if tp > 1:
        from measure import tp_campaign

        click.echo(f"all-reduces over {tp} GPUs, {len(tp_campaign.ALLREDUCE_SIZES)} message sizes -> {out}", err=True)
        try:
            tp_campaign.allreduce_bench(out, tp)
        except RuntimeError as exc:  # a rank failed: its own traceback is above
            raise KfsimError(str(exc)) from None
        return
    from measure import microbench as mb

    rows = mb.run_all(out, echo=lambda m: click.echo(m, err=True))
    click.echo(table([[r["bench"], str(r.get("batch", "")), str(r.get("heads", "")), str(r.get("context", "")),
                       f"{r['median_ms']:.4f}", str(r.get("gbps", "")), str(r.get("tflops", "")),
                       str(r.get("us_per_kernel", ""))] for r in rows],
                     ["bench", "batch", "heads", "context", "ms", "GB/s", "TFLOP/s", "us/kernel"]))


_MEASURED_ENGINE = click.option("--measured-engine", metavar="NAME",
                                help="Use only rows whose `engine` column is NAME (e.g. torch-graph).")
_PHASE = click.option("--phase", type=click.Choice(["all", "decode", "prefill"]), default="all", show_default=True,
                      help="Which rows to use.")


def _kernels_of(rows) -> str:
    """'; kernels: ...' naming the kernel features the rows record (measure's kernel_options column), or ''."""
    if "kernel_options" not in rows.columns:
        return ""
    kinds = sorted({str(v) for v in rows["kernel_options"].dropna() if str(v)})
    return f"; kernels: {' | '.join(kinds)}" if kinds else ""


@cli.command()
@click.argument("files", nargs=-1, required=True, metavar="MEAS.csv [MORE.csv ...]")
@click.option("--out", required=True, metavar="ENGINE.yaml", help="Where to write the fitted engine.")
@click.option("--name", metavar="NAME", help="The engine's name. [default: the --out file's stem]")
@click.option("--microbench", "micro", multiple=True, metavar="FILE",
              help="Microbenchmark CSV from the same GPU (repeatable): caps the bandwidth fractions at what the "
                   "skinny-GEMM and SDPA benchmarks reached.")
@_MEASURED_ENGINE
@_PHASE
@click.option("--fused-scorer", is_flag=True,
              help="The measured decoder scores Keyformer inside its attention kernel (measure's `compiled` "
                   "engine): fit keyformer_flops_per_kv_byte, the arithmetic that keeps that kernel from "
                   "speeding up with memory bandwidth, and take the scorer's logit passes (2: one fp32 z written "
                   "and read) and launches (none of its own) from the kernel's design instead of fitting them.")
@click.option("--matvec-max-batch", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="The measured decoder multiplies weights with matrix-vector kernels up to batch N (measure's "
                   "`compiled` engine: 1, its fused Triton GEMVs): fit their bandwidth and kernel counts apart "
                   "from the GEMMs'. 0: GEMMs at every batch.")
@click.option("--host-dispatch", is_flag=True,
              help="The measured decoder dispatches every kernel from Python each step (eager PyTorch, "
                   "transformers without graphs): fit the host's cost per kernel and per step (a step takes the "
                   "longer of host and GPU) and the KV traffic per attended byte (a cache appended by copying "
                   "moves it more than once), the full cache's and, with rows of an evicting policy, the "
                   "evicting caches' apart (transformers' own cache and attention against a Keyformer cache "
                   "that writes in place and attends through its own kernel); with rows of models with and "
                   "without grouped KV heads, how far attention expands grouped heads to one copy per query "
                   "head (grouped_kv_expansion).")
@click.option("--kv-traffic", is_flag=True,
              help="The measured decoder replays graphs (no host dispatch to fit) but still moves the cache more "
                   "than once (a static cache attended whole, grouped heads expanded before attention): fit the KV "
                   "traffic per attended byte and, with models with and without grouped KV heads, "
                   "grouped_kv_expansion. Implied by --host-dispatch.")
@click.option("--host-ops", "host_ops_file", metavar="FILE",
              help="With --host-dispatch: the operations the measured stack dispatches per step of each model, "
                   "counted on a CPU (python -m measure.host_ops --out FILE): the host's cost is fitted per counted "
                   "operation, and models counted but never timed are predicted from their own counts.")
@click.option("--kv-passes", "kv_passes_file", metavar="FILE",
              help="The bytes the measured stack moves per attended KV byte for each model, counted on a CPU "
                   "(python -m measure.kv_passes --out FILE): a counted model's full cache is priced by its count "
                   "(streamed passes at kv_bandwidth_fraction, concatenations with a strided input at "
                   "strided_copy_gbps_per_sm on each SM, from rows that make them or else the cat_strided "
                   "microbenchmark) instead of a fitted kv_traffic_factor, and its Keyformer or H2O cache by the "
                   "counted passes of that cache and its scorer (paths keyformer, h2o) instead of fitted logit "
                   "passes, so models counted but never timed are predicted from their own code's traffic.")
@click.option("--prefill-counts", "prefill_counts_file", metavar="FILE",
              help="Prefill's attention as the measured stack's code runs it, counted per score (one sequence, "
                   "query head, query and key of the prompt) for each model on a CPU (python -m "
                   "measure.prefill_counts --out FILE): a counted model's prefill is priced by its 16-bit and "
                   "fp32 matrix FLOPs and the bytes of the scores it materialises (at a fitted "
                   "score_bandwidth_fraction), with its Keyformer or H2O scorer's work, instead of the "
                   "roofline's causal half, so models counted but never timed are predicted from their own "
                   "code's attention.")
@click.option("--profile", "profile_file", metavar="FILE",
              help="A profile of kfsim measure --profile (OUT-profile.csv): also fit the kernel time of each "
                   "operation group (projections, attention, keyformer, ffn, positional, lm_head) against the model's "
                   "time for it, so the engine is right about where the time goes, not only about the step; with "
                   "the positional group, the rotary embedding's kernels per op are fitted apart from the layer's "
                   "fixed cost.")
@click.option("--json", "as_json", is_flag=True, help="Print the fit as JSON.")
def calibrate(files, out, name, micro, measured_engine, phase, fused_scorer, matvec_max_batch, host_dispatch,
              kv_traffic, host_ops_file, kv_passes_file, prefill_counts_file, profile_file, as_json):
    """Fit an engine (efficiency parameters) to measured decode and prefill times.

    \b
    Example: kfsim calibrate data/h100-sxm-plain/rows.csv --measured-engine torch-graph
             --microbench data/h100-sxm-plain/microbench.csv --out my-engine.yaml
    """
    _need("calibrate", "pandas", "scipy")
    import dataclasses
    import json
    from pathlib import Path

    from . import calibrate as cal
    from .engine import fitted_on_text
    from .fmt import table
    from .hardware import get_hardware
    from .measurements import load
    from .validate import metrics

    from .files import output_path

    output_path(out, "out", inputs=[*files, *micro, *([profile_file] if profile_file else []),
                                    *([host_ops_file] if host_ops_file else []),
                                    *([kv_passes_file] if kv_passes_file else []),
                                    *([prefill_counts_file] if prefill_counts_file else [])])
    if host_ops_file and not host_dispatch:
        raise KfsimError("--host-ops counts what an eager stack dispatches: it needs --host-dispatch")
    start = cal.IDEAL
    if host_ops_file:
        start = dataclasses.replace(start, host_ops=cal.read_host_ops(host_ops_file))
    if kv_passes_file:
        start = dataclasses.replace(start, kv_passes=cal.read_kv_passes(kv_passes_file))
    if prefill_counts_file:
        start = dataclasses.replace(start, prefill_attention=cal.read_prefill_counts(prefill_counts_file))
    df = load(files, measured_engine, phase)
    profile = None
    if profile_file is not None:
        profile = _read_profile(profile_file, measured_engine, df)
    split = df["tp"] > 1
    if split.all():
        raise KfsimError("every row is tensor-parallel (tp > 1): calibrate fits an engine on single-GPU rows, and "
                         "its interconnect terms on an all-reduce microbenchmark (kfsim microbench --tp N); "
                         "kfsim validate checks tensor-parallel rows")
    if split.any():
        click.echo(f"note: {int(split.sum())} tensor-parallel row(s) set aside: the fit uses single-GPU rows and "
                   "the all-reduce microbenchmark; kfsim validate checks them", err=True)
        df = df[~split]
    bounds, interconnect, measured = {}, {}, {}
    for m in micro:
        import pandas as pd

        try:
            mb = pd.read_csv(m)
            gpu = str(mb["gpu"].dropna().iloc[0])
        except (OSError, KeyError, IndexError, UnicodeDecodeError, pd.errors.ParserError,
                pd.errors.EmptyDataError) as exc:
            raise KfsimError(f"{m}: not a microbenchmark CSV from `kfsim microbench` "
                             f"({first_line(exc)})") from None
        if missing := [c for c in ("bench", "gbps") if c not in mb.columns]:
            raise KfsimError(f"{m}: not a microbenchmark CSV from `kfsim microbench` (no column "
                             f"{', '.join(missing)})")
        mb["gbps"] = pd.to_numeric(mb["gbps"], errors="coerce")
        for k, v in cal.ceilings(mb, get_hardware(gpu)).items():
            bounds[k] = min(v, bounds.get(k, v))
        measured.update(cal.copy_rates(mb, get_hardware(gpu)))
        try:
            interconnect = cal.fit_interconnect(mb, get_hardware(gpu)) or interconnect
        except KfsimError as exc:
            raise KfsimError(f"{m}: {exc}") from None
    name = name or Path(out).stem
    start = dataclasses.replace(start, **measured)
    f = cal.fit(df, name=name, start=start, where=", ".join(files), bounds=bounds, fused_scorer=fused_scorer,
                matvec_max_batch=matvec_max_batch, host_dispatch=host_dispatch, profile=profile,
                profile_where=profile_file or "profile", kv_traffic=kv_traffic)
    gpus = sorted(df["gpu"].astype(str).unique())
    counts = df["phase"].value_counts().to_dict()
    described = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    policies = tuple(sorted(df.loc[df["phase"] == "decode", "policy"].astype(str).unique()))
    eng = cal.rounded(dataclasses.replace(f.engine, **interconnect),
                      fitted_on=fitted_on_text(gpus, measured_engine, f.n, described),
                      fitted_policies=policies,
                      description=f"fitted by kfsim calibrate on {', '.join(files)}"
                      + ("" if "prefill" in counts else "; no prefill rows, so prefill is the ideal roofline")
                      + _kernels_of(df),
                      source={"fit": f"kfsim calibrate {' '.join(files)}"
                                     + "".join(f" --microbench {m}" for m in micro)
                                     + (f" --measured-engine {measured_engine}" if measured_engine else "")
                                     + (" --fused-scorer" if fused_scorer else "")
                                     + (f" --matvec-max-batch {matvec_max_batch}" if matvec_max_batch else "")
                                     + (" --host-dispatch" if host_dispatch else "")
                                     + (" --kv-traffic" if kv_traffic and not host_dispatch else "")
                                     + (f" --host-ops {host_ops_file}" if host_ops_file else "")
                                     + (f" --kv-passes {kv_passes_file}" if kv_passes_file else "")
                                     + (f" --prefill-counts {prefill_counts_file}" if prefill_counts_file else "")
                                     + (f" --profile {profile_file}" if profile_file else ""),
                              **({"interconnect": "fitted on the all-reduce microbenchmark"} if interconnect else {}),
                              **{k: "from the cat_strided microbenchmarks" for k in measured if k not in f.fitted},
                              "in_sample_mape_pct": f"{f.mape:.2f}",
                              "caps": ", ".join(f"{k} <= {v:.3f}" for k, v in bounds.items()
                                                if k in f.fitted) or "none"})
    eng.write(out)
    m = metrics(f.ape)
    edges = cal.at_bounds({k: getattr_path(eng, k) for k in f.fitted}, bounds)
    fitted = [*f.fitted, *interconnect]
    if as_json:
        click.echo(json.dumps({**m, "engine": str(out), "fitted": {k: getattr_path(eng, k) for k in fitted},
                               "at_bound": edges, "tensor_parallel_rows_set_aside": int(split.sum()),
                               **({"profiled_group_times": f.profiled} if profile is not None else {})}))
        return
    for k, where in edges.items():
        click.echo(f"warning: {k} ended at its {where}: the rows pull it further (or cannot inform it); "
                   "its value is a limit, not a measurement", err=True)
    click.echo(f"fitted {len(f.fitted)} parameters on {f.n} rows from {', '.join(gpus)}; in-sample MAPE {m['mape']:.2f}%, "
               f"median {m['median_ape']:.2f}%, worst {m['max_ape']:.2f}%")
    if profile is not None:
        click.echo(f"and on {f.profiled} profiled group times from {profile_file} (projections, attention, keyformer, "
                   "ffn, positional, lm_head where the profile and the model both have them)")
    rows = [[k, f"{getattr_path(eng, k):.4g}", f"{cal.bounds_of(k, bounds)}"] for k in f.fitted]
    rows += [[k, f"{getattr_path(eng, k):.4g}", "from the all-reduce microbenchmark"] for k in interconnect]
    click.echo(table(rows, ["parameter", "value", "allowed range"]))
    click.echo(f"wrote {out}  (use: kfsim predict --engine {out} ...)")


def getattr_path(obj, dotted):
    field, _, key = dotted.partition(".")
    value = getattr(obj, field)
    return value[key] if key else value


@cli.command(name="fit-power")
@click.argument("files", nargs=-1, required=True, metavar="MEAS.csv [MORE.csv ...]")
@click.option("--engine", default="default", show_default=True, metavar="NAME|FILE",
              help="Engine whose byte counts (Keyformer's logit passes) the rates use.")
@_MEASURED_ENGINE
@click.option("--holdout", type=_Finite(0, 0.9), default=0.5, show_default=True, metavar="F",
              help="Fraction of rows left out of the fit (at random, --seed) to check energy per step on.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the held-out rows.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures and errors as JSON.")
def fit_power(files, engine, measured_engine, holdout, seed, as_json):
    """Fit a GPU's board-power model (idle W, pJ per HBM byte, pJ per FLOP) to measured power, and check the
    energy per step it predicts on held-out rows. Paste the three figures into the GPU's profile.

    \b
    Example: kfsim fit-power data/h200-plain-models/rows.csv --measured-engine torch-graph
    """
    _need("fit-power", "pandas", "scipy")
    import json

    import numpy as np
    import yaml

    from .engine import get_engine
    from .hardware import get_hardware
    from .measurements import load
    from .power_fit import energy_error_pct, fit_rows, usable
    from .validate import metrics

    eng = get_engine(engine)
    df, above, unread = usable(load(files, measured_engine, "decode"))
    held = np.random.default_rng(seed).random(len(df)) < holdout
    figures = fit_rows(df[~held].reset_index(drop=True), eng)
    test = df[held].reset_index(drop=True)
    check = metrics(energy_error_pct(test, get_hardware(figures["gpu"]), figures, eng)) if len(test) else metrics([])
    out = {**figures, "rows_above_limit_dropped": above, "rows_without_power": unread, "held_out_energy": check}
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{figures['gpu']}: fitted on {figures['rows']} rows (in-sample power MAPE {figures['mape_pct']}%)"
               + (f"; {above} rows above the board limit dropped" if above else "")
               + (f"; {unread} rows without a power reading (power_w, idle_w) left out" if unread else ""))
    click.echo(yaml.safe_dump({k: figures[k] for k in ("idle_w", "pj_per_byte", "pj_per_flop")}).rstrip())
    if check["n"]:
        click.echo(f"energy per step on {check['n']} held-out rows: MAPE {check['mape']:.2f}%, median "
                   f"{check['median_ape']:.2f}%, worst {check['max_ape']:.2f}%")


@cli.command()
@click.argument("files", nargs=-1, required=True, metavar="MEAS.csv [MORE.csv ...]")
@click.option("--engine", required=True, metavar="NAME|FILE", help="Engine to predict with (`ideal`, shipped, file).")
@click.option("--out", metavar="DIR", help="Write report.md, rows.csv and PNG figures into DIR.")
@click.option("--title", metavar="TEXT", help="Title of the report. [default: from the files and engine]")
@_MEASURED_ENGINE
@_PHASE
@click.option("--profile", "profile_file", metavar="FILE",
              help="A profile of kfsim measure --profile (OUT-profile.csv): also compare each profiled step's time "
                   "by operation group with the model's, so you see where the model is wrong.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON (percent).")
def validate(files, engine, out, title, measured_engine, phase, profile_file, as_json):
    """Compare predictions with measurements: error metrics by model and policy, plots, a Markdown report.

    \b
    Example: kfsim validate data/h200-plain/rows.csv --measured-engine torch-graph --engine default
             --out reports/h200-default
    """
    _need("validate", "pandas", "matplotlib")
    import json

    from . import validate as val
    from .engine import get_engine
    from .power_fit import validate_energy
    from .fmt import table
    from .measurements import load

    from .files import output_path

    if out is not None:
        output_path(out, "out", inputs=files, folder=True, writes=val.REPORT_FILES)
    eng = get_engine(engine)
    df = load(files, measured_engine, phase)
    cmp = val.compare(df, eng, ", ".join(files))
    m = val.metrics(cmp["error_pct"])
    groups = val.by_group(cmp)
    energy = validate_energy(cmp, eng)
    by_op = None
    if profile_file is not None:
        from .breakdown import compare_groups

        by_op = compare_groups(_read_profile(profile_file, measured_engine, df), eng, profile_file, timed=df)
    if out:
        title = title or f"kfsim validation: engine {eng.name} on {', '.join(files)}"
        val.write_report(cmp, eng, out, title, list(files), by_op)
    if as_json:
        click.echo(json.dumps({**m, "engine": eng.name, "by_group": groups.to_dict(orient="records"),
                               "by_tp": val.by_tp(cmp), "energy": energy,
                               **({"by_operation_group": by_op.to_dict(orient="records")} if by_op is not None
                                  else {})}))
        return
    click.echo(table([[str(v) for v in r] for r in groups.itertuples(index=False)], list(groups.columns)))
    click.echo(f"\nall {m['n']} rows: MAPE {m['mape']:.2f}%, median {m['median_ape']:.2f}%, worst {m['max_ape']:.2f}%")
    for t in val.by_tp(cmp):
        click.echo(f"tp {t['tp']}, {t['n']} rows: MAPE {t['mape']:.2f}%, median {t['median_ape']:.2f}%, "
                   f"worst {t['max_ape']:.2f}%")
    if energy:
        click.echo(f"energy per step, {energy['n']} rows: MAPE {energy['mape']:.2f}%, median {energy['median_ape']:.2f}%, "
                   f"worst {energy['max_ape']:.2f}% (the GPU's power model at the predicted step)")
    if by_op is not None:
        click.echo(f"\nby operation group ({profile_file}): kernels of eager steps under the profiler; gaps: the timed "
                   "step less them (the profiled step where a point was not timed); error in percent of that step")
        click.echo(table([[r.model, str(r.batch), str(r.context), r.policy, f"{r.kv_ratio:g}", r.group,
                           f"{r.measured_ms:.3f}", f"{r.predicted_ms:.3f}", f"{r.error_pct_of_step:+.1f}"]
                          for r in by_op.itertuples(index=False)],
                         ["model", "batch", "context", "policy", "kv_ratio", "group", "measured_ms",
                          "predicted_ms", "error_%_step"]))
    if out:
        click.echo(f"wrote {out}/report.md, rows.csv and figures")


@cli.command()
@click.option("--gpu", "gpus", default="h100-sxm", show_default=True, metavar="LIST", help="GPUs, e.g. a100,h100,h200.")
@click.option("--model", "models", default="gpt-j-6b", show_default=True, metavar="LIST", help="Models.")
@click.option("--batch", default="1", show_default=True, metavar="LIST|RANGE", help="Batches: 1,8,32 or 1:64:1.")
@click.option("--seq", required=True, metavar="LIST|RANGE", help="Contexts: 1024,4096 or 256:16384:256 (inclusive).")
@click.option("--kv-ratio", default="1", show_default=True, metavar="LIST", help="KV budgets (fractions of context).")
@click.option("--policy", default="keyformer", show_default=True, metavar="LIST",
              help="Policies for kv-ratio < 1 (kv-ratio 1 is always the full cache).")
@click.option("--kv-dtype", default="", metavar="LIST", help="KV dtypes. [default: each model's]")
@click.option("--engine", default="default", show_default=True, metavar="LIST", help="Engines (names or files).")
@click.option("--window", type=float, default=0.3, show_default=True, callback=_ratio,
              help="Recent window as a fraction of the budget.")
@click.option("--tp", default="1", show_default=True, metavar="LIST", help="Tensor-parallel degrees, e.g. 1,2,4,8.")
@click.option("--max-points", type=click.IntRange(min=1), default=20_000_000, show_default=True,
              help="Refuse a sweep larger than this before computing it (each point is a row in memory).")
@click.option("--out", metavar="FILE", help="Write every point to FILE (.csv or .parquet).")
def sweep(gpus, models, batch, seq, kv_ratio, policy, kv_dtype, engine, window, tp, max_points, out):
    """Predict the cross product of the lists in one vectorised pass.

    \b
    Example: kfsim sweep --gpu a100,h100,h200 --model llama-3-8b --batch 1:64:1 --seq 256:16384:256
             --kv-ratio 1,0.5,0.2 --out sweep.parquet
    """
    _need("sweep", "pandas")
    from . import sweep as sw
    from .fmt import table
    from .values import parse_list

    lists = dict(
        gpus=parse_list(gpus, "gpu", str), models=parse_list(models, "model", str),
        batches=parse_list(batch, "batch", int, lo=1), seqs=parse_list(seq, "seq", int, lo=1),
        kv_ratios=parse_list(kv_ratio, "kv-ratio", float, lo=1e-6, hi=1),
        policies=parse_list(policy, "policy", choices=("full", "keyformer", "h2o", "window")),
        kv_dtypes=parse_list(kv_dtype, "kv-dtype", str) if kv_dtype else [None],
        engines=parse_list(engine, "engine", str), tps=parse_list(tp, "tp", int, lo=1))
    points = math.prod(len(v) for v in lists.values())
    if points > max_points:
        raise KfsimError(f"the sweep has {points:,} points; the limit is {max_points:,} (raise it with --max-points)")
    if out is not None:
        sw.check_out(out)
    progress = sw.Progress(lambda n: click.progressbar(length=n, label="sweeping", file=sys.stderr))
    df = sw.sweep(window=window, on_progress=progress, **lists)
    progress.close()
    say_notes(df.attrs["caveats"])
    if out:
        sw.write(df, out)
        click.echo(f"wrote {len(df):,} points to {out}")
        return
    cols = ["gpu", "model", "policy", "kv_ratio", "batch", "seq", "step_ms", "tokens_per_s", "fits"]
    shown = df[cols].head(40)
    click.echo(table([[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in shown.itertuples(index=False)],
                     cols))
    if len(df) > len(shown):
        click.echo(f"... {len(df) - len(shown):,} more points; write them all with --out FILE.csv")


@cli.command()
@click.option("--model", default="gpt-j-6b", show_default=True, metavar="NAME", help="Model to serve.")
@click.option("--prompt-len", type=click.IntRange(min=1, max=10_000_000), required=True, metavar="P",
              help="Prompt tokens per request.")
@click.option("--gen-len", type=click.IntRange(min=1, max=1_000_000), required=True, metavar="G",
              help="Generated tokens per request.")
@click.option("--target-tokens-per-s", type=POSITIVE, metavar="T",
              help="Generated tokens per second the whole deployment must serve (a static batch per GPU).")
@click.option("--rate", type=POSITIVE, metavar="R",
              help="Requests per second to serve instead, found by simulating continuous batching (kfsim "
                   "simulate) against --max-ttft-ms and --max-tpot-ms at the 90th percentile.")
@click.option("--max-ttft-ms", type=POSITIVE, metavar="MS",
              help="--rate: p90 time to first token, ms.")
@click.option("--max-tpot-ms", type=POSITIVE, metavar="MS",
              help="--rate: p90 time per output token, ms.")
@click.option("--weight-dtype", metavar="D", help="Weight dtype of every option. [default: the model's]")
@click.option("--kv-dtype", metavar="D", help="KV-cache dtype of every option. [default: the model's]")
@click.option("--max-step-ms", type=POSITIVE, metavar="L",
              help="Latency bound on every decode step (time between tokens), ms.")
@click.option("--gpus", default="a100,h100,h200", show_default=True, metavar="LIST", help="GPU types to consider.")
@click.option("--kv-ratio", default="1,0.5,0.2", show_default=True, metavar="LIST", help="KV budgets to consider.")
@click.option("--policy", type=click.Choice(["keyformer", "h2o", "window"]), default="keyformer", show_default=True,
              help="Policy used for kv-ratio < 1.")
@click.option("--engine", default="default", show_default=True, metavar="NAME|FILE", help="Engine.")
@click.option("--usd-per-hour", "prices", default="", metavar="GPU=PRICE,...",
              help="Hourly price per GPU for cost per million tokens, e.g. h100=2.5,h200=3.2.")
@click.option("--tp", default="1,2,4,8", show_default=True, metavar="LIST",
              help="Tensor-parallel degrees to consider (degrees the model cannot be split into are skipped).")
@click.option("--json", "as_json", is_flag=True, help="Print the options as JSON, best first.")
def plan(model, prompt_len, gen_len, target_tokens_per_s, rate, max_ttft_ms, max_tpot_ms, weight_dtype, kv_dtype,
         max_step_ms, gpus, kv_ratio, policy, engine, prices, tp, as_json):
    """Which GPU, tensor-parallel degree, batch, KV budget and GPU count serve a token rate (a static batch) or a
    request rate (simulated continuous batching, within p90 TTFT and TPOT targets); the best first.

    \b
    Example: kfsim plan --model llama-3-8b --prompt-len 2048 --gen-len 256 --target-tokens-per-s 20000
             --max-step-ms 50 --usd-per-hour h100=2.5,h200=3.2
    Example: kfsim plan --model llama-3-8b --prompt-len 8192 --gen-len 512 --rate 20 --max-ttft-ms 2000
             --max-tpot-ms 50 --usd-per-hour h100=2.5,h200=3.2
    """
    from .fmt import table
    from .hardware import get_hardware
    from .inputs import make_setup
    from .plan import plan as make_plan
    from .values import parse_list

    price = {}
    for item in parse_list(prices, "usd-per-hour", str) if prices else []:
        gpu, sep, value = item.partition("=")
        if not sep:
            raise KfsimError(f"--usd-per-hour: {item!r} must be GPU=PRICE, e.g. h100=2.5")
        name = get_hardware(gpu).name  # an unknown GPU is named as such, not as a bad price
        try:
            usd = float(value)
        except ValueError:
            raise KfsimError(f"--usd-per-hour: price {value!r} for {gpu} is not a number") from None
        if not (math.isfinite(usd) and usd > 0):
            raise KfsimError(f"--usd-per-hour: price {value!r} for {gpu}; allowed: a finite number > 0")
        price[name] = usd
    from .parallel import TP_DEGREES, check_tp
    from .workload import get_workload

    degrees = parse_list(tp, "tp", int, lo=1)
    if bad := [n for n in degrees if n not in TP_DEGREES]:
        raise KfsimError(f"--tp: {bad[0]} is not allowed; allowed: {', '.join(map(str, TP_DEGREES))}")
    w = get_workload(model)
    splits = []
    for n in degrees:
        try:
            check_tp(w, n)
            splits.append(n)
        except KfsimError:  # a degree this model's heads do not split into: not an option
            pass
    if not splits:
        raise KfsimError(f"--tp {tp}: model {w.name} splits over none of these degrees")
    if (target_tokens_per_s is None) == (rate is None):
        raise KfsimError("give either --target-tokens-per-s T (a static batch) or --rate R (simulated serving)")
    if rate is None and (max_ttft_ms or max_tpot_ms):
        raise KfsimError("--max-ttft-ms and --max-tpot-ms go with --rate (simulated serving); with "
                         "--target-tokens-per-s bound the step with --max-step-ms")
    setups = [make_setup(gpu=g, model=model, engine=engine, policy=None if r >= 1 else policy, kv_ratio=r, tp=n,
                         weight_dtype=weight_dtype, kv_dtype=kv_dtype)
              for g in parse_list(gpus, "gpus", str) for r in parse_list(kv_ratio, "kv-ratio", float, lo=1e-6, hi=1)
              for n in splits]
    say_notes(note for s in setups for note in s.caveats + s.request_notes(prompt_len))
    if rate is not None:
        return _plan_serving(setups, model, prompt_len, gen_len, rate, max_ttft_ms, max_tpot_ms, price, as_json)
    options = make_plan(setups, prompt_len, gen_len, target_tokens_per_s, max_step_ms, price)
    bound = f" within {max_step_ms:g} ms per step" if max_step_ms else ""
    best = _options_head(options, as_json, f"No option serves {model}{bound}")
    if best is None:
        return
    cost = (f", ${best.usd_per_million_tokens:.3f} per million tokens" if best.usd_per_million_tokens is not None
            else " (give --usd-per-hour to rank by cost)")
    say(f"Recommended: {best.gpus_needed} x {best.gpu} (tensor-parallel groups of {best.tp}), {best.policy} "
        f"kv-ratio {best.kv_ratio:g}, batch {best.batch} per group: {best.tokens_per_s_per_gpu:,.0f} generated "
        f"tokens/s per GPU{cost}, {best.joules_per_token:.3f} J/token, step {best.step_ms:.1f} ms, TTFT "
        f"{best.ttft_ms:,.0f} ms.")
    _what_reduction_buys(options, lambda o: "" if o.usd_per_million_tokens is None
                         else f", ${o.usd_per_million_tokens:.3f}/Mtok")
    say(f"(model {model}, {prompt_len} + {gen_len} tokens per request, target {target_tokens_per_s:,.0f} "
        f"tokens/s{bound}, engine {setups[0].engine.name})")
    click.echo()
    rows = [[o.gpu, str(o.tp), o.policy, f"{o.kv_ratio:g}", str(o.batch) if o.feasible else "-",
             str(o.gpus_needed) if o.feasible else "-", f"{o.tokens_per_s_per_gpu:,.0f}" if o.feasible else "-",
             f"{o.step_ms:.1f}" if o.feasible else "-", f"{o.ttft_ms:,.0f}" if o.feasible else "-",
             "-" if o.usd_per_million_tokens is None else f"{o.usd_per_million_tokens:.3f}",
             f"{o.joules_per_token:.3f}" if o.feasible else "-", o.why] for o in options]
    click.echo(table(rows, ["gpu", "tp", "policy", "kv_ratio", "batch", "gpus", "tok/s/gpu", "step_ms", "ttft_ms",
                            "usd/Mtok", "J/token", "note"]))


def say(text: str, err: bool = False) -> None:
    """Print a sentence wrapped at 100 columns (on stderr with `err`)."""
    import textwrap

    click.echo(textwrap.fill(text, 100, subsequent_indent="  ", break_on_hyphens=False), err=err)


def say_notes(notes) -> None:
    """Each note once, on stderr, so that a table or JSON on stdout stays as it was."""
    for note in dict.fromkeys(notes):
        say(f"note: {note}", err=True)


def _options_head(options, as_json: bool, none_text: str):
    """The best of `plan`'s options, best first; None once `--json` printed them. Where none is feasible, says
    why for each and exits with status 1."""
    import json

    from .plan import as_json as option_json

    best = options[0]
    if as_json:
        click.echo(json.dumps([option_json(o) for o in options], indent=2))
    elif not best.feasible:
        say(f"{none_text}: " + "; ".join(f"{o.gpu} tp {o.tp} kv-ratio {o.kv_ratio:g}: {o.why}" for o in options))
    if not best.feasible:
        sys.exit(1)
    return None if as_json else best


def _what_reduction_buys(options, cost) -> None:
    """The best reducing-policy option against the best full-cache one, where both are feasible."""
    full = next((o for o in options if o.feasible and o.policy == "full"), None)
    reduced = next((o for o in options if o.feasible and o.policy != "full"), None)
    if full and reduced:
        say(f"What KV reduction buys: the best {reduced.policy} option needs {reduced.gpus_needed} GPUs"
            f"{cost(reduced)}; the best full-cache option {full.gpus_needed}{cost(full)}.")


def _plan_serving(setups, model, prompt_len, gen_len, rate, max_ttft_ms, max_tpot_ms, price, as_json):
    """`plan --rate`: the cheapest deployment serving the rate within the p90 latency targets, by simulation."""
    from .fmt import table
    from .plan import plan_serving

    options = plan_serving(setups, prompt_len, gen_len, rate, max_ttft_ms, max_tpot_ms, price)
    targets = " and ".join(x for x in (max_ttft_ms and f"p90 TTFT {max_ttft_ms:g} ms",
                                        max_tpot_ms and f"p90 TPOT {max_tpot_ms:g} ms") if x) or "no latency target"
    best = _options_head(options, as_json, f"No option serves {rate:g} requests/s of {model} within {targets}")
    if best is None:
        return
    cost = lambda o: "" if o.usd_per_hour is None else f", ${o.usd_per_hour:,.2f}/h"  # noqa: E731
    say(f"Recommended: {best.replicas} replica(s) of {best.tp} x {best.gpu} ({best.gpus_needed} GPUs{cost(best)}), "
        f"{best.policy} kv-ratio {best.kv_ratio:g}: each replica sustains {best.rate_per_replica:.3g} requests/s with p90 TTFT "
        f"{best.ttft_p90_ms:,.0f} ms and TPOT {best.tpot_p90_ms:.1f} ms.")
    _what_reduction_buys(options, cost)
    say(f"(model {model}, {prompt_len} + {gen_len} tokens per request at {rate:g} requests/s, within {targets}; "
        f"engine {setups[0].engine.name}; continuous batching simulated)")
    click.echo()
    from .plan import NOT_SIMULATED

    shown = [o for o in options if o.why != NOT_SIMULATED]
    rows = [[o.gpu, str(o.tp), o.policy, f"{o.kv_ratio:g}", *(
        [f"{o.rate_per_replica:.3g}", str(o.replicas), str(o.gpus_needed), f"{o.ttft_p90_ms:,.0f}",
         f"{o.tpot_p90_ms:.1f}", "-" if o.usd_per_hour is None else f"{o.usd_per_hour:,.2f}", ""]
        if o.feasible else ["-"] * 6 + [o.why[:30]])] for o in shown]
    click.echo(table(rows, ["gpu", "tp", "policy", "kv_ratio", "req/s/rep", "replicas", "gpus", "ttft_p90",
                            "tpot_p90", "usd/h", "note"]))
    if len(shown) < len(options):
        click.echo(f"({len(options) - len(shown)} more deployments not simulated: {NOT_SIMULATED}; --json lists them)")


@cli.command()
@click.option("--gpu", default="h100", show_default=True, metavar="NAME", help="GPU profile (see `kfsim list gpus`).")
@click.option("--model", default="llama-3-8b", show_default=True, metavar="NAME", help="Model served.")
@click.option("--engine", default="default", show_default=True, metavar="NAME|FILE", help="Engine.")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Tensor-parallel GPUs of the deployment (1, 2, 4, 8).")
@click.option("--policy", type=click.Choice(["full", "keyformer", "h2o", "window"]),
              help="KV policy. [default: keyformer when --kv-ratio < 1, else full]")
@click.option("--kv-ratio", type=float, default=1.0, show_default=True, callback=_ratio,
              help="A reducing policy keeps this fraction of each prompt (0 < R <= 1).")
@click.option("--window", type=float, default=0.3, show_default=True, callback=_ratio,
              help="Recent window as a fraction of the budget.")
@click.option("--dtype", "weight_dtype", metavar="D", help="Weight dtype. [default: the model's]")
@click.option("--kv-dtype", metavar="D", help="KV-cache dtype. [default: the model's]")
@click.option("--rate", type=POSITIVE, metavar="R",
              help="Poisson arrivals, requests per second (or give --trace).")
@click.option("--requests", "n_requests", type=click.IntRange(min=1, max=10_000_000), default=1000,
              show_default=True, help="Requests to simulate with --rate.")
@click.option("--prompt-len", default="2048", show_default=True, metavar="SPEC",
              help="Prompt tokens: N, uniform:LO:HI or normal:MEAN:STD.")
@click.option("--gen-len", default="256", show_default=True, metavar="SPEC",
              help="Generated tokens: N, uniform:LO:HI or normal:MEAN:STD.")
@click.option("--trace", metavar="FILE.csv", help="Requests from a CSV (arrival_s, prompt_tokens, gen_tokens).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the arrivals.")
@click.option("--max-batch", type=click.IntRange(min=1, max=4096), metavar="N",  # 4096: simulate.MAX_BATCH
              help="Most requests running at once. [default: as many as memory holds]")
@click.option("--chunk-tokens", type=click.IntRange(min=1, max=1_000_000), default=2048, show_default=True,
              help="Token budget of one engine step (decodes plus prompt chunks), as vLLM's max_num_batched_tokens.")
@click.option("--slo-ttft-ms", type=POSITIVE, metavar="MS",
              help="Goodput counts requests whose first token comes within MS.")
@click.option("--slo-tpot-ms", type=POSITIVE, metavar="MS",
              help="... and whose later tokens come MS apart or less.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def simulate(gpu, model, engine, tp, policy, kv_ratio, window, weight_dtype, kv_dtype, rate, n_requests, prompt_len,
             gen_len, trace, seed, max_batch, chunk_tokens, slo_ttft_ms, slo_tpot_ms, as_json):
    """Serve a request stream on one deployment: continuous batching with chunked prefill, KV memory per request
    (Keyformer's capped at its budget after the prompt), preemption when memory runs out.

    \b
    Example: kfsim simulate --gpu h100 --model llama-3-8b --rate 4 --prompt-len 8192 --gen-len 512
             --kv-ratio 0.5 --slo-ttft-ms 2000 --slo-tpot-ms 50
    """
    import json

    from . import simulate as sim
    from .fmt import table
    from .inputs import make_setup

    if (rate is None) == (trace is None):
        raise KfsimError("give either --rate R (Poisson arrivals) or --trace FILE.csv")
    s = make_setup(gpu=gpu, model=model, engine=engine, policy=policy, kv_ratio=kv_ratio, window=window,
                   weight_dtype=weight_dtype, kv_dtype=kv_dtype, tp=tp)
    req = sim.read_trace(trace) if trace else sim.poisson_requests(rate, n_requests, prompt_len, gen_len, seed)
    s = s.with_requests(int(req.prompt.min()))
    longest = int((req.prompt + req.gen).max())
    cap = sim.batch_cap(s, int(req.prompt.min()), max_batch)
    times = sim.StepTimes(s, cap, longest, chunk_tokens)
    sim.check_fits(times, req)
    with click.progressbar(length=len(req.gen), label="simulating", file=sys.stderr) as bar:
        seen = [0]

        def progress(done):
            bar.update(done - seen[0])
            seen[0] = done

        result = sim.simulate(times, req, cap, chunk_tokens, on_progress=progress)
    out = sim.summary(result, req, slo_ttft_ms, slo_tpot_ms, times.capacity)
    head = {"gpu": s.hw.name, "model": s.workload.name, "engine": s.engine.name, "tp": tp,
            "policy": s.policy.kind if s.policy.evicts else "full", "kv_ratio": s.policy.kv_ratio,
            "max_batch": cap, "chunk_tokens": chunk_tokens, "notes": list(s.notes)}
    if as_json:
        click.echo(json.dumps({**head, **out}, indent=2))
        return
    click.echo(f"{s.workload.name} on {tp} x {s.hw.name}, engine {s.engine.name}, policy {head['policy']} "
               f"(kv-ratio {kv_ratio:g}); {out['requests']:,} requests over {out['makespan_s']:,.1f} s")
    for note in s.notes:
        say(f"note: {note}")
    rows = [[name, *(f"{out[f'{key}_p{p}_ms']:,.1f}" for p in (50, 90, 99))]
            for name, key in (("time to first token", "ttft"), ("time per output token", "tpot"),
                              ("end to end", "e2e"))]
    click.echo(table(rows, ["ms", "p50", "p90", "p99"]))
    slo = " within " + " and ".join(x for x in (slo_ttft_ms and f"TTFT {slo_ttft_ms:g} ms",
                                                 slo_tpot_ms and f"TPOT {slo_tpot_ms:g} ms") if x) \
        if (slo_ttft_ms or slo_tpot_ms) else ""
    rate = lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.3g}"  # noqa: E731 - 3 figures, never a rounded 0
    click.echo(f"throughput {rate(out['throughput_tokens_per_s'])} generated tokens/s, "
               f"{rate(out['throughput_requests_per_s'])} requests/s; goodput{slo} "
               f"{rate(out['goodput_requests_per_s'])} requests/s ({100 * out['slo_attained']:.0f}% of requests)")
    click.echo(f"peak batch {out['peak_batch']} (cap {cap}), peak KV memory {out['peak_memory_bytes'] / 1e9:.1f} GB "
               f"of {times.capacity / 1e9:.1f} GB free beside the weights, {out['preemptions']} preemptions")


@cli.command()
@click.option("--model", default="gpt-j-6b", show_default=True, metavar="NAME", help="Model to report on.")
@click.option("--gpus", default="a100,h100,h200", show_default=True, metavar="LIST",
              help="GPUs; the first is used where a figure shows one GPU.")
@click.option("--engine", default="default", show_default=True, metavar="NAME|FILE", help="Engine.")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Batch for figures that fix one.")
@click.option("--seq", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Context for figures that fix one.")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Tensor-parallel GPUs per deployment (1, 2, 4, 8).")
@click.option("--out", required=True, metavar="DIR", help="Folder for report.html, report.md and the PNG figures.")
def report(model, gpus, engine, batch, seq, tp, out):
    """Write a self-contained HTML report (and Markdown) with capacity-planning figures.

    \b
    Example: kfsim report --model llama-3-8b --gpus h100,h200 --out reports/llama-3-8b/
    """
    _need("report", "matplotlib")
    from .inputs import make_setup
    from .report import build
    from .values import parse_list

    from .files import output_path

    output_path(out, "out", folder=True)
    gpu_list = parse_list(gpus, "gpus", str)
    # resolve every name first: a bad one is a one-line error before any figure is drawn
    setups = [make_setup(gpu=g, model=model, engine=engine, tp=tp) for g in gpu_list]
    say_notes(note for s in setups for note in s.caveats + s.request_notes(None))  # report serves requests
    path = build(model, gpu_list, engine, out, batch, seq, tp)
    click.echo(f"wrote {path} and report.md with 7 figures")


def main():
    cli(prog_name="kfsim")
