"""Model architecture (what a decode step must read and compute) and scenario presets (prompt and output lengths)."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import catalog
from .dtypes import STORAGE_DTYPES, DType
from .errors import KfsimError
from .loader import rng


@dataclass(frozen=True)
class Scenario:
    """A request shape: prompt tokens in, generated tokens out."""

    prompt_len: int = rng(1)
    gen_len: int = rng(1)
    source: str = ""


@dataclass(frozen=True)
class Workload:
    """A decoder-only transformer as its Hugging Face config describes it."""

    name: str
    description: str
    family: str = rng(choices=("gptj", "gpt2", "mpt", "llama"))
    n_layers: int = rng(1)
    d_model: int = rng(1)
    n_heads: int = rng(1)
    ffn_dim: int = rng(1)
    vocab_size: int = rng(1)
    max_context: int = rng(1)
    n_kv_heads: int | None = rng(1, default=None)
    head_dim: int | None = rng(1, default=None)
    ffn_type: str = rng(choices=("gelu", "swiglu"), default="gelu")
    tied_embeddings: bool = False
    parallel_residual: bool = False
    position: str = rng(choices=("rotary", "learned", "alibi"), default="rotary")
    rotary_dim: int | None = rng(1, default=None)
    rope_theta: float = rng(above=0, default=10000.0)
    norm: str = rng(choices=("layernorm", "rmsnorm"), default="layernorm")
    attn_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True
    lm_head_bias: bool = False
    sliding_window: int | None = rng(1, default=None)
    weight_dtype: str = rng(choices=STORAGE_DTYPES, default="bf16")
    kv_dtype: str = rng(choices=STORAGE_DTYPES, default="bf16")
    scenarios: dict[str, Scenario] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    source: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        where = f"workload {self.name}"
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise KfsimError(f"{where}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise KfsimError(
                    f"{where}: d_model {self.d_model} is not divisible by n_heads {self.n_heads}; give head_dim"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.position == "rotary" and self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if self.rotary_dim is not None and self.rotary_dim > self.head_dim:
            raise KfsimError(f"{where}: rotary_dim {self.rotary_dim} exceeds head_dim {self.head_dim}")
        if not self.source.get("architecture"):
            raise KfsimError(f"{where}: give source.architecture (where the shapes come from)")

    # ---- parameter counts (hand-checkable; see tests/test_counts.py) ----
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def attn_params_per_layer(self) -> int:
        """Q, K, V and output projections (with biases where the model has them)."""
        d = self.d_model
        weights = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
        bias = (self.q_dim + 2 * self.kv_dim + d) if self.attn_bias else 0
        return weights + bias

    @property
    def ffn_matrices(self) -> int:
        """2 for a GELU MLP (up, down); 3 for SwiGLU (gate, up, down)."""
        return 3 if self.ffn_type == "swiglu" else 2

    @property
    def ffn_params_per_layer(self) -> int:
        weights = self.ffn_matrices * self.d_model * self.ffn_dim
        bias = ((self.ffn_matrices - 1) * self.ffn_dim + self.d_model) if self.mlp_bias else 0
        return weights + bias

    @property
    def norms_per_layer(self) -> int:
        """A parallel block (GPT-J) has one norm feeding attention and MLP; a sequential block has two."""
        return 1 if self.parallel_residual else 2

    @property
    def norm_params(self) -> int:
        return self.d_model * (2 if self.norm_bias else 1)

    @property
    def params_per_layer(self) -> int:
        return self.attn_params_per_layer + self.ffn_params_per_layer + self.norms_per_layer * self.norm_params

    @property
    def embedding_params(self) -> int:
        """Token embedding plus learned position table, which a decode step gathers one row of, not streams."""
        pos = self.max_context * self.d_model if self.position == "learned" else 0
        return self.vocab_size * self.d_model + pos

    @property
    def lm_head_params(self) -> int:
        """Output projection: shares the embedding's storage when tied, but is streamed every step either way."""
        return self.vocab_size * self.d_model + (self.vocab_size if self.lm_head_bias else 0)

    @property
    def n_params(self) -> int:
        """All parameters stored (a tied LM head is counted once)."""
        head = 0 if self.tied_embeddings else self.lm_head_params
        return self.embedding_params + self.n_layers * self.params_per_layer + self.norm_params + head

    @property
    def streamed_params(self) -> int:
        """Parameters a decode step reads in full: every layer, the final norm and the LM head matrix."""
        return self.n_layers * self.params_per_layer + self.norm_params + self.lm_head_params

    def kv_bytes_per_token(self, kv_dtype: DType | None = None) -> float:
        """K and V for one token across all layers: 2 x layers x KV heads x head dim x bytes."""
        dt = kv_dtype or DType.parse(self.kv_dtype)
        return 2 * self.n_layers * self.kv_dim * dt.bytes

    def scenario(self, name: str) -> Scenario:
        if name not in self.scenarios:
            raise KfsimError(
                f"model {self.name} has no scenario {name!r}; known: {', '.join(self.scenarios) or 'none'}"
            )
        return self.scenarios[name]


def get_workload(name_or_path: str) -> Workload:
    """A shipped model by name or alias (`gpt-j-6b`, `llama-3-8b`), or a workload YAML file by path."""
    return catalog.resolve("model", name_or_path, Workload)
