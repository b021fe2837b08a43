"""The `kfsim` command: parse flags, call the model, format the answer. No model logic lives here."""
from __future__ import annotations

import sys

import click

from .errors import KfsimError


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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="kfsim")
def cli():
    """kfsim: predict LLM decode latency, throughput, memory and energy on a GPU, with and without Keyformer
    KV-cache reduction.

    \b
    First prediction:   kfsim predict --gpu a100 --seq 4096 --kv-ratio 0.5
    What ships:         kfsim list gpus | models | engines
    """


def _ratio(ctx, param, value):
    if value is not None and not (0 < value <= 1):
        raise click.BadParameter(f"{value:g} is out of range; allowed: 0 < value <= 1")
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
@click.option("--dtype", "weight_dtype", metavar="D", help="Weight dtype: fp32, bf16, fp16, fp8, int8, int4. "
              "[default: the model's]")
@click.option("--kv-dtype", metavar="D", help="KV-cache dtype: fp32, bf16, fp16, fp8, int8, int4. [default: the model's]")
@click.option("--prompt-len", type=click.IntRange(min=1), metavar="P", help="Prompt tokens of a whole request.")
@click.option("--gen-len", type=click.IntRange(min=1), metavar="G", help="Generated tokens of a whole request.")
@click.option("--scenario", metavar="NAME", help="A model's preset prompt/gen lengths (e.g. summarization).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def predict(gpu, hw_file, model, workload_file, batch, seq, kv_ratio, policy, window, engine, weight_dtype, kv_dtype,
            prompt_len, gen_len, scenario, as_json):
    """Predict one decode step (and, with --prompt-len/--gen-len, a whole request).

    \b
    Example: kfsim predict --gpu a100 --seq 4096 --kv-ratio 0.5
    """
    from . import fmt
    from .views import predict_text
    from .inputs import make_setup

    s = make_setup(gpu=gpu, hw_file=hw_file, model=model, workload_file=workload_file, engine=engine,
                   policy=policy, kv_ratio=kv_ratio, window=window, weight_dtype=weight_dtype, kv_dtype=kv_dtype)
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

    out = run(s, batch, seq, prompt_len, gen_len)
    header = {"gpu": s.hw.name, "model": s.workload.name, "engine": s.engine.name, "policy": s.policy.kind
              if s.policy.evicts else "full", "kv_ratio": s.policy.kv_ratio, "window": s.policy.window,
              "batch": batch, "seq": seq, "weight_dtype": str(s.dtypes.weight), "kv_dtype": str(s.dtypes.kv)}
    if as_json:
        click.echo(fmt.to_json({**header, **out}))
    else:
        click.echo(predict_text(s, header, out))


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
        from .fmt import table

        click.echo(table(rows, header))


def main():
    cli(prog_name="kfsim")
