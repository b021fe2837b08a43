"""Decoding through Hugging Face transformers, the stack most people decode with (`kfsim measure --backend hf`).

The library's own model classes are built from a kfsim workload's shape with random weights (or loaded from a
local checkpoint), and decode with the library's own caches: the dynamic cache in eager PyTorch (`hf-eager`), or the
static cache under torch.compile (`hf-compiled`). Keyformer is a transformers cache, `KeyformerCache`, whose layers
physically hold the budget (measure.kv_policies.EvictingCache does the eviction and the paper's scores); the
attention hook it needs is installed by `enable_keyformer(model)`, after which

    model.generate(input_ids, past_key_values=KeyformerCache(kv_ratio=0.5), max_new_tokens=...)

decodes with Keyformer (any other cache still attends through the model's own attention). Keyformer's hook covers
models whose attention goes through transformers' attention interface (Llama, Mistral and their kin), GPT-J and MPT.
Its decode step has fixed shapes and never waits for the GPU, so it also runs under torch.compile (`hf-compiled`)
in one CUDA graph, below kv-ratio 1 (at 1 the cache grows, a host-side decision).
"""
from __future__ import annotations

import functools
import math

import torch

from kfsim.errors import KfsimError
from kfsim.workload import Workload

from .decoder import alibi_bias, alibi_slopes
from .kv_policies import EMPTY, EvictingCache

#: HF modes -> the `engine` column of their rows
ENGINES = {"eager": "hf-eager", "compiled": "hf-compiled"}
#: families whose attention Keyformer's hook reaches (attention interface, or GPT-J's own `_attn`)
KEYFORMER_FAMILIES = ("llama", "gptj", "mpt")


def hf_config(w: Workload, max_positions: int):
    """The transformers config of workload `w`, with position tables of at least `max_positions` (random weights:
    a context past the trained one costs what it costs, as kfsim predicts it)."""
    import transformers as tf

    positions = max(w.max_context, max_positions)
    if w.family == "llama":
        kw = dict(vocab_size=w.vocab_size, hidden_size=w.d_model, intermediate_size=w.ffn_dim,
                  num_hidden_layers=w.n_layers, num_attention_heads=w.n_heads, num_key_value_heads=w.n_kv_heads,
                  head_dim=w.head_dim, max_position_embeddings=positions, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": w.rope_theta},
                  tie_word_embeddings=w.tied_embeddings, attention_bias=w.attn_bias, mlp_bias=w.mlp_bias)
        if w.sliding_window:
            return tf.MistralConfig(sliding_window=w.sliding_window, **kw)
        return tf.LlamaConfig(**kw)
    if w.family == "gptj":
        return tf.GPTJConfig(vocab_size=w.vocab_size, n_positions=positions, n_embd=w.d_model, n_layer=w.n_layers,
                             n_head=w.n_heads, rotary_dim=w.rotary_dim, n_inner=w.ffn_dim,
                             tie_word_embeddings=w.tied_embeddings)
    if w.family == "gpt2":
        return tf.GPT2Config(vocab_size=w.vocab_size, n_positions=positions, n_embd=w.d_model, n_layer=w.n_layers,
                             n_head=w.n_heads, n_inner=w.ffn_dim, tie_word_embeddings=w.tied_embeddings)
    if w.family == "mpt":
        return tf.MptConfig(d_model=w.d_model, n_heads=w.n_heads, n_layers=w.n_layers,
                            expansion_ratio=w.ffn_dim // w.d_model, max_seq_len=positions, vocab_size=w.vocab_size,
                            no_bias=not w.attn_bias, attn_config={"alibi": True})
    raise KfsimError(f"workload {w.name}: family {w.family!r} has no transformers class here")


def build_model(w: Workload, max_positions: int, dtype=torch.bfloat16, device="cuda", checkpoint: str | None = None):
    """The transformers model of `w`: random weights made on `device`, or the local checkpoint folder's."""
    import transformers as tf

    if checkpoint:
        model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, local_files_only=True)
        return model.to(device).eval()
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(hf_config(w, max_positions), dtype=dtype)
    return model.eval()


# ---- Keyformer as a transformers cache ----

#: the Keyformer cache layer whose new keys and values the next attention call consumes (set by
#: KeyformerCache.update, taken by the hook right after it in the same layer's forward)
_PENDING: list = [None]


@functools.cache
def _cache_classes():
    """KeyformerLayer and KeyformerCache, made on first use so that importing this module needs no transformers."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class KeyformerLayer(CacheLayerMixin):
        """One layer's Keyformer cache: an EvictingCache of budget + 1 slots, made at the prompt (budget = kv_ratio x
        prompt, as the authors' code fixes it), and the count of tokens seen (positions go on past the budget)."""

        is_sliding = False

        def __init__(self, kv_ratio: float, window: float, kind: str, max_budget: int | None):
            super().__init__()
            self.kv_ratio, self.window, self.kind, self.max_budget = kv_ratio, window, kind, max_budget
            self.evicting: EvictingCache | None = None
            self.seen = 0
            self.position: torch.Tensor | None = None  # seen, on the device: a Python int would be copied over
            # to the GPU each step, and that copy waits for the GPU's queue (a host sync per layer)
            self.new_kv = None
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            pass

        def budget_for(self, prompt: int) -> int:
            budget = max(1, math.ceil(self.kv_ratio * prompt - 1e-9))
            return min(budget, self.max_budget) if self.max_budget else budget

        def start(self, batch: int, kv_heads: int, head_dim: int, prompt: int, dtype, device) -> EvictingCache:
            budget = self.budget_for(prompt)
            ev = EvictingCache(self.kind, batch, kv_heads, budget, round(self.window * budget), head_dim, dtype,
                               device)
            self.evicting, self.position = ev, torch.full((), prompt, dtype=torch.long, device=device)
            for t in (ev.k, ev.v, ev.pos, ev.score, ev.free, ev.step, self.position):
                # fixed addresses, as transformers' StaticCache marks its tensors: a compiled step updates them in
                # place inside its CUDA graph instead of the graph being re-recorded for each mutated input
                torch._dynamo.mark_static_address(t)
            return ev

        def update(self, key_states, value_states, *args, **kwargs):
            """Hold the new keys and values for the hook (which writes them into the kept slots)."""
            self.new_kv = (key_states, value_states)
            _PENDING[0] = self
            return key_states, value_states

        def attend(self, query: torch.Tensor, scale: float, alibi: torch.Tensor | None = None) -> torch.Tensor:
            """Attention of `query` [B, H, T, D] over what the layer keeps plus the new tokens, then score and
            evict: the prompt when nothing is kept yet, else one decode step. `alibi`: the heads' ALiBi slopes
            (MPT), applied at the kept tokens' own positions. Returns [B, H, T, D]."""
            key, value = self.new_kv
            self.new_kv = None
            B, Hkv, T, D = key.shape
            if self.evicting is None:
                ev = self.start(B, Hkv, D, T, key.dtype, key.device)
                ev.scale = scale
                pos = torch.arange(T, device=key.device)
                bias = None if alibi is None else alibi_bias(alibi.to(key.device), pos[None, :], pos[:, None])
                out = ev.prefill(query, key, value, bias)
            elif T == 1:
                if self.kv_ratio >= 1:
                    self._make_room()
                self.evicting.scale = scale
                bias_fn = None if alibi is None else functools.partial(alibi_bias, alibi, group=query.shape[1] // Hkv)
                out = self.evicting.decode(query, key, value, self.position, bias_fn)
                self.position += 1
            else:
                raise KfsimError("KeyformerCache takes one prompt, then one token per step (no chunked or "
                                 "speculative decoding)")
            self.seen += T
            return out

        def _make_room(self) -> None:
            """kv-ratio 1 keeps every token: before the slots run out (the free one and one more), twice the
            budget, the kept tokens, their scores and positions copied over."""
            old = self.evicting
            if int((old.pos == EMPTY).sum(dim=-1).min()) >= 2:
                return
            B, Hkv, _, D = old.k.shape
            new = EvictingCache(old.kind, B, Hkv, 2 * old.budget, old.window, D, old.k.dtype, old.k.device)
            n = old.used
            new.k[:, :, :n], new.v[:, :, :n] = old.k[:, :, :n], old.v[:, :, :n]
            new.pos[:, :, :n], new.score[:, :, :n] = old.pos[:, :, :n], old.score[:, :, :n]
            new.free.copy_(old.free)
            new.step.copy_(old.step)
            new.noise, new.scale, new.tau_delta = old.noise, old.scale, old.tau_delta
            self.evicting = new

        def get_seq_length(self) -> int:
            return self.seen

        def get_mask_sizes(self, query_length) -> tuple[int, int]:
            q = int(query_length.shape[0]) if isinstance(query_length, torch.Tensor) else int(query_length)
            return self.seen + q, 0

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            self.evicting, self.seen, self.new_kv, self.position = None, 0, None, None

        def reorder_cache(self, beam_idx) -> None:
            raise KfsimError("KeyformerCache does not take beam search (each beam would need its own scores)")

    class KeyformerCache(Cache):
        """Keyformer's KV cache for transformers' `generate()` and forward calls (after `enable_keyformer(model)`):
        each layer keeps `kv_ratio` x the prompt's tokens (at most `max_budget`), the recent `window` fraction of
        them always, the rest by accumulated Gumbel-softmax score; `kind='h2o'` keeps by accumulated attention."""

        def __init__(self, kv_ratio: float = 0.5, window: float = 0.3, kind: str = "keyformer",
                     max_budget: int | None = None):
            if not 0 < kv_ratio <= 1:
                raise KfsimError(f"KeyformerCache: kv_ratio {kv_ratio} is out of range; allowed: 0 < kv_ratio <= 1")
            if not 0 < window <= 1:
                raise KfsimError(f"KeyformerCache: window {window} is out of range; allowed: 0 < window <= 1")
            if kind not in ("keyformer", "h2o"):
                raise KfsimError(f"KeyformerCache: kind {kind!r}; allowed: keyformer, h2o")
            super().__init__(layer_class_to_replicate=lambda: KeyformerLayer(kv_ratio, window, kind, max_budget))
            self.kv_ratio = kv_ratio

        def steady(self, batch: int, kv_heads: int, head_dim: int, layers: int, context: int, dtype, device):
            """Every layer in the steady state of a context of `context` tokens (random keys, values and scores),
            for timing a decode step at that context."""
            while len(self.layers) < layers:
                self.layers.append(self.layer_class_to_replicate())
            for layer in self.layers:
                layer.start(batch, kv_heads, head_dim, context, dtype, device).fill_random(context)
                layer.seen = context
            return self

        @property
        def cached_tokens(self) -> int:
            """Tokens each layer keeps before a step adds one (the budget)."""
            return self.layers[0].evicting.cached_tokens if self.layers and self.layers[0].evicting else 0

    return KeyformerLayer, KeyformerCache


def __getattr__(name: str):
    """KeyformerCache and KeyformerLayer, the transformers cache classes, made when first asked for (PEP 562)."""
    if name in ("KeyformerLayer", "KeyformerCache"):
        return _cache_classes()[name == "KeyformerCache"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _take_pending():
    """The Keyformer layer whose cache update came right before this attention call (None: another cache's)."""
    layer, _PENDING[0] = _PENDING[0], None
    return layer


def _keyformer_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: Keyformer where its cache handed this layer new tokens, else the
    implementation the model had before (`module.config._keyformer_fallback`)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    layer = _take_pending()
    if layer is None:
        fallback = ALL_ATTENTION_FUNCTIONS[module.config._keyformer_fallback]
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(query, scale).transpose(1, 2).contiguous(), None


def _keyformer_mask(*args, **kwargs):
    """The fallback implementation's mask (Keyformer's own attention needs none: its cache holds only real,
    earlier tokens)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    config = kwargs.get("config")
    name = getattr(config, "_keyformer_fallback", "sdpa") if config is not None else "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS[name](*args, **kwargs)


def _mpt_forward(attn, alibi_bias_max: float):
    """MptAttention.forward with Keyformer where a KeyformerCache is passed (MPT computes its attention inline, with
    an ALiBi bias sliced as if the cache held contiguous positions: Keyformer's kept tokens are not)."""
    plain = attn.forward
    slopes = alibi_slopes(attn.n_heads, alibi_bias_max)
    slopes_on = [slopes]  # the slopes on the device the model last ran on
    keyformer_cache = _cache_classes()[1]  # resolved here: torch.compile cannot trace the class's creation

    def forward(hidden_states, position_bias, *args, **kwargs):
        # the cache is the third argument: past_key_values in transformers 5.17, cache in 5.25
        cache = args[0] if args else kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(cache, keyformer_cache):
            return plain(hidden_states, position_bias, *args, **kwargs)
        B, T = hidden_states.shape[:2]
        qkv = attn.Wqkv(hidden_states)
        if attn.clip_qkv:
            qkv = qkv.clamp(min=-attn.clip_qkv, max=attn.clip_qkv)
        q, k, v = (t.reshape(B, T, attn.n_heads, attn.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
        cache.update(k, v, attn.layer_idx)
        if slopes_on[0].device != q.device:  # moved once: a copy each step would wait for the GPU
            slopes_on[0] = slopes.to(q.device)
        out = _take_pending().attend(q, attn.softmax_scale, alibi=slopes_on[0])
        return attn.out_proj(out.transpose(1, 2).reshape(B, T, -1)), None

    return forward


def enable_keyformer(model) -> None:
    """Install the attention hook KeyformerCache needs (once per model; other caches keep the model's attention)."""
    family = model.config.model_type
    if family == "mpt":
        for block in model.transformer.blocks:
            attn = block.attn
            if not getattr(attn, "_keyformer_hooked", False):
                attn.forward = _mpt_forward(attn, model.config.attn_config.alibi_bias_max)
                attn._keyformer_hooked = True
        return
    if family == "gptj" and hasattr(model.transformer.h[0].attn, "_attn"):  # 5.17's own _attn; 5.25: interface
        for layer in model.transformer.h:
            attn = layer.attn
            if getattr(attn, "_keyformer_plain", None) is None:
                attn._keyformer_plain = attn._attn
                attn._attn = _gptj_attn(attn)
        return
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if model.config._attn_implementation == "keyformer":
        return
    if family not in ("llama", "mistral", "gptj"):
        raise KfsimError(f"KeyformerCache has no attention hook for {family} models here (Llama, Mistral, GPT-J, "
                         f"MPT)")
    AttentionInterface.register("keyformer", _keyformer_attention)
    AttentionMaskInterface.register("keyformer", _keyformer_mask)
    model.config._keyformer_fallback = model.config._attn_implementation or "sdpa"
    model.set_attn_implementation("keyformer")


def _gptj_attn(attn):
    """GPT-J's `_attn(query, key, value, attention_mask)` with Keyformer where its cache handed over new tokens."""
    plain = attn._keyformer_plain
    # a Python number here, once: GPT-J keeps sqrt(head_dim) as a CPU tensor, which read inside a compiled step
    # cost it 0.12 ms a layer on the H100 (lab/data/hf/h100-gptj-scale-graphs.csv)
    scale = float(1.0 / attn.scale_attn)

    def keyformer_attn(query, key, value, attention_mask=None):
        layer = _take_pending()
        if layer is None:
            return plain(query, key, value, attention_mask)
        return layer.attend(query, scale), None

    return keyformer_attn
