"""Time decode steps through transformers (measure.hf) with the same points, rows and resuming as campaign.py.

A decode point is a steady-state step at `context` tokens: the library's cache is filled with random keys and
values of that many tokens (Keyformer's with its budget of them and random scores), and every timed step decodes
one token for each sequence. The dynamic cache grows by one token a step (transformers appends by copying); it is
cut back to `context` after each step, outside the timed region and contiguous as a real step leaves it, so that
every timed step costs what step `context` costs. The static cache is rewound the same way. Eager steps are timed
as they run, Python dispatch included, one CUDA event pair per step.
"""
from __future__ import annotations

import torch

from kfsim.errors import KfsimError, first_line
from kfsim.workload import get_workload

from . import hf, host_ops, timing
from .campaign import Point, Runner

#: position tables of the random-weight models cover contexts up to this (GPT-J's and GPT-2's are sized by it)
MAX_POSITIONS = 32768 + 512


class HfRunner(Runner):
    """Runner for `kfsim measure --backend hf`: `mode` eager (dynamic cache) or compiled (static cache, or
    KeyformerCache, under torch.compile); `checkpoint`: a local model folder instead of random weights."""

    def __init__(self, mode="eager", checkpoint=None, steps=30, warmup=5, window=0.3, nvml=None, profile=False):
        super().__init__(steps=steps, warmup=warmup, window=window, nvml=nvml, engine=hf.ENGINES[mode],
                         profile=profile)
        self.mode, self.checkpoint, self.graph = mode, checkpoint, False
        self.uncompiled: dict[tuple, str] = {}  # (model, cache) -> why torch.compile could not compile it

    @classmethod
    def steps_only(cls, mode="eager", window=0.3, steps=5, warmup=1) -> "HfRunner":
        """A runner whose steady steps (steady_step) run on any device, built without a GPU's environment: for
        counting a step's operations on a CPU (measure.host_ops) and for tests."""
        runner = object.__new__(cls)
        runner.mode, runner.window, runner.steps, runner.warmup, runner.compiled = mode, window, steps, warmup, None
        runner.uncompiled = {}
        return runner

    def model_for(self, name):
        if name != self.model_name:
            self.model = self.compiled = None
            torch.cuda.empty_cache()
            self.model = hf.build_model(get_workload(name), MAX_POSITIONS, checkpoint=self.checkpoint)
            if get_workload(name).family in hf.KEYFORMER_FAMILIES:
                hf.enable_keyformer(self.model)
            if self.mode == "compiled":
                # dynamic shapes from the start: two compiles per model (batch 1, then any batch; 57-94 s each on
                # the H100, data/h100-sxm-hf-compiled) and a CUDA graph per shape, where static shapes recompile
                # for every point (30-85 s each)
                self.compiled = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True,
                                              dynamic=True)
            self.model_name = name
        return self.model

    def measure(self, pt: Point, power: bool = True) -> dict:
        why = self._supported(pt)
        if why is None:
            try:
                return super().measure(pt, power)
            except torch._dynamo.exc.TorchDynamoException as exc:  # the model's code, not this point: skip the model
                why = f"torch.compile cannot compile this model's forward: {first_line(exc)}"[:200]
                self.uncompiled[_compiled_key(pt)] = why
        return {**self.row_head(pt), "status": "unsupported", "error": why}

    def _supported(self, pt: Point) -> str | None:
        """Why transformers cannot measure `pt` here (None: it can)."""
        w = get_workload(pt.model)
        if _compiled_key(pt) in self.uncompiled:
            return self.uncompiled[_compiled_key(pt)]
        if pt.phase != "decode" and self.mode != "eager":
            return "prefill through transformers is measured with --hf-mode eager (compiled, each prompt recompiles)"
        if pt.context + self.steps + self.warmup + 8 > MAX_POSITIONS:
            return f"context {pt.context} is past the {MAX_POSITIONS} positions the models are built with"
        if pt.policy != "full" and w.family not in hf.KEYFORMER_FAMILIES:
            return (f"{pt.policy} through transformers runs on Llama-, Mistral-, GPT-J- and MPT-style models only "
                    f"({w.family} model)")
        if pt.policy != "full" and self.mode == "compiled" and pt.kv_ratio >= 1:
            return (f"{pt.policy} at kv-ratio 1 grows its cache, a decision on the host that torch.compile cannot "
                    f"capture: measured with --hf-mode eager only")
        if pt.policy == "full" and self.mode == "compiled" and w.sliding_window and pt.context + 1 > w.sliding_window:
            return (f"the static cache of a sliding window ({w.sliding_window} slots) rolls instead of holding "
                    f"context {pt.context} + 1: not measured here")
        if pt.policy not in ("full", "keyformer", "h2o"):
            return f"policy {pt.policy} has no transformers cache here (full, keyformer, h2o)"
        return None

    def _decode(self, model, w, pt, power=True) -> dict:
        step, cache, rewind = self.steady_step(model, w, pt)
        t = timing.time_steps(step, self.steps, self.warmup, after=rewind)
        ops = host_ops.count(step) if self.mode == "eager" else None  # one untimed step: what the host dispatched
        rewind()
        return {**self._timing_fields(t), **(self._energy(lambda: (step(), rewind()), t.median_ms) if power else {}),
                "cached_tokens": cached_tokens(cache, w, pt), "host_ops": ops}

    def _prefill(self, model, w, pt, power=True) -> dict:
        step, made = self.prefill_step(model, w, pt)
        return self._time_prefill(step, power, lambda: cached_tokens(made[-1], w, pt))

    def prefill_step(self, model, w, pt, device="cuda"):
        """(step, made): one prefill of `batch` prompts of `context` tokens into a new cache, as generate() runs it
        before the first token (the library's dynamic cache, or a KeyformerCache that keeps kv_ratio x prompt,
        scoring every prompt query), and the list that holds the last step's cache."""
        from transformers import DynamicCache

        tokens = torch.randint(0, w.vocab_size, (pt.batch, pt.context), device=device)
        made = []

        def step():
            made[:] = [DynamicCache(config=model.config) if pt.policy == "full" else self._keyformer_cache(w, pt)]
            return model(input_ids=tokens, past_key_values=made[0], use_cache=True, logits_to_keep=1)

        return step, made

    def profile_point(self, pt: Point) -> dict:
        """An eager step of decode point `pt` by operation group (measure.profile.profile_step); eager mode only,
        as hooks would break the compiled graph."""
        from .profile import profile_step

        if self.mode != "eager":
            raise KfsimError("--profile breaks down transformers' eager steps (--hf-mode eager) only")
        w = get_workload(pt.model)
        model = self.model_for(pt.model)
        with torch.inference_mode():
            step, _, rewind = self.steady_step(model, w, pt)
            result = profile_step(model, step, after=rewind)
        torch.cuda.empty_cache()
        return result

    def steady_step(self, model, w, pt, device="cuda"):
        """(step, cache, rewind): one decode step of every sequence at `pt`, its cache, and what puts the cache
        back to `context` tokens after a step."""
        tokens = torch.randint(0, w.vocab_size, (pt.batch, 1), device=device)
        if pt.policy != "full":
            cache = self._keyformer_cache(w, pt)
            cache.steady(pt.batch, w.n_kv_heads, w.head_dim, w.n_layers, pt.context, torch.bfloat16, device)
            if self.mode == "compiled":
                return self._compiled_keyformer_step(cache, pt, tokens, device)
            return (lambda: model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1),
                    cache, lambda: None)
        if self.mode == "compiled":
            return self._static_step(model, w, pt, tokens, device)
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        for i in range(w.n_layers):
            k = torch.randn(pt.batch, w.n_kv_heads, pt.context, w.head_dim, dtype=torch.bfloat16, device=device)
            cache.update(k, torch.randn_like(k), i)
        growing = [layer for layer in cache.layers if not layer.is_sliding]  # a sliding window trims itself

        def rewind():
            # cut back to `context` tokens, contiguous as the cache a real step leaves (its append's fresh copy):
            # a cut view would make the next append copy from a strided source, a cost real decoding never pays
            for layer in growing:
                layer.crop(-1)
                layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()

        return (lambda: model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1),
                cache, rewind)

    def _keyformer_cache(self, w, pt):
        """An empty KeyformerCache of `pt`'s policy and kv-ratio, holding at most `w`'s sliding window."""
        return hf.KeyformerCache(pt.kv_ratio, self.window, pt.policy, max_budget=w.sliding_window)

    def _static_step(self, model, w, pt, tokens, device):
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=pt.context + 1)
        model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)  # allocates every layer
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
            layer.cumulative_length.fill_(pt.context)

        def put_back():
            for layer in cache.layers:
                layer.cumulative_length.fill_(pt.context)

        return self._compiled_step(cache, pt, tokens, device, put_back, advance=False)

    def _compiled_keyformer_step(self, cache, pt, tokens, device):
        """The compiled Keyformer step: positions go on (as in the eager step), while the tokens-seen count is put
        back after each step, as the static cache's is (a count that grew would give the compiled graph a new
        size every step; Keyformer's attention does not read it)."""

        def put_back():
            for layer in cache.layers:
                layer.seen = pt.context

        return self._compiled_step(cache, pt, tokens, device, put_back, advance=True)

    def _compiled_step(self, cache, pt, tokens, device, put_back, advance: bool):
        """(step, cache, rewind) of the compiled forward over `cache` at position `context`, given as tensors
        (a Python int would be a new size to the graph each step): `put_back` after each step, and the
        positions moved on by one where `advance`."""
        position = torch.full((pt.batch, 1), pt.context, device=device)
        cache_position = torch.tensor([pt.context], device=device)

        def rewind():
            put_back()
            if advance:
                position.add_(1)
                cache_position.add_(1)

        return (lambda: self.compiled(input_ids=tokens, past_key_values=cache, position_ids=position,
                                      cache_position=cache_position, use_cache=True, logits_to_keep=1),
                cache, rewind)


def _compiled_key(pt: Point) -> tuple:
    """What one torch.compile attempt covers: a model with transformers' own cache, or with KeyformerCache (MPT's
    own attention does not compile; Keyformer's does)."""
    return pt.model, pt.policy == "full"


def cached_tokens(cache, w, pt: Point) -> int:
    """Tokens a step attends besides the new one: the Keyformer budget, the sliding window, or the context."""
    if pt.policy != "full":
        return cache.cached_tokens
    return min(pt.context, w.sliding_window) if w.sliding_window else pt.context


def check_installed() -> None:
    """A one-line error where transformers is missing."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise KfsimError("kfsim measure --backend hf needs transformers: pip install -e '.[measure]'")
