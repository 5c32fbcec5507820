"""LlamaForge configuration: the field names of transformers' `LlamaConfig`, so Llama tooling reads ours.

Self-contained (imports nothing from llamaforge): `save_pretrained` copies this file next to the
weights and `trust_remote_code=True` loads it.

Architecture switches (LlamaConfig's names where it has them): `hidden_act` "silu" = SwiGLU MLP,
"gelu_new" = GPT-2's GELU MLP; `norm_type` "rmsnorm" | "layernorm"; `position_embedding_type`
"rope" | "learned" (absolute, GPT-2); `attention_bias`, `mlp_bias`. The defaults are LLaMA; the
gpt2 presets set all five (see docs/training.md, "A second architecture").

A LLaMA-shaped model (RMSNorm, rotary, SwiGLU) is saved as a stock Llama config: `model_type:
"llama"`, `architectures: ["LlamaForCausalLM"]`, every field written out (a stock reader fills a
missing field with its own default, not ours), and `auto_map` pointing at these files. Loaded with
`trust_remote_code=True` the Auto classes use this class; without it, transformers' own Llama. The
GPT-2 variant has no stock twin under the Llama names and is saved as `model_type: "llamaforge"`
(llamaforge-only; `llamaforge export --format gpt2` writes a stock GPT-2 folder).

Rotary settings live where the installed transformers keeps them for Llama: `rope_parameters`
(transformers >= 5: {"rope_type": "default"|"linear", "factor": F, "rope_theta": T}) or the older
`rope_scaling` + `rope_theta`. Both spellings are accepted on input.
"""

from transformers import PretrainedConfig

# transformers >= 5 turned `rope_scaling` into a deprecated alias of `rope_parameters`.
_HAS_ROPE_PARAMETERS = isinstance(getattr(PretrainedConfig, "rope_scaling", None), property)


class LlamaForgeConfig(PretrainedConfig):
    model_type = "llama"  # what PEFT, lm-eval and other Llama-aware tools key on; see to_dict for GPT-2
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        intermediate_size: int = 1376,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 256,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        rms_norm_eps: float = 1e-5,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        hidden_act: str = "silu",
        norm_type: str = "rmsnorm",
        position_embedding_type: str = "rope",
        attention_bias: bool = False,
        mlp_bias: bool = False,
        **kwargs,
    ):
        for name, value, allowed in (("hidden_act", hidden_act, ("silu", "gelu_new")),
                                     ("norm_type", norm_type, ("rmsnorm", "layernorm")),
                                     ("position_embedding_type", position_embedding_type, ("rope", "learned"))):
            if value not in allowed:
                raise ValueError(f"model.{name} {value!r} is not supported; use one of {', '.join(allowed)}")
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size), ("num_hidden_layers", num_hidden_layers),
                            ("num_attention_heads", num_attention_heads), ("num_key_value_heads", num_key_value_heads),
                            ("max_position_embeddings", max_position_embeddings)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} is {value!r}; it must be a positive whole number")
        if not rms_norm_eps > 0 or not rope_theta > 0:
            raise ValueError("model.rms_norm_eps and model.rope_theta must be positive")
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}; "
                "pick a head count that divides the hidden size"
            )
        if num_attention_heads % num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads {num_key_value_heads} does not divide num_attention_heads "
                f"{num_attention_heads}; use a divisor of the head count"
            )
        if position_embedding_type == "rope" and (hidden_size // num_attention_heads) % 2:
            raise ValueError("head dimension must be even for rotary embeddings; change hidden_size or heads")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.position_embedding_type = position_embedding_type
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        rope = kwargs.pop("rope_parameters", None) or rope_scaling
        self.rope_theta = float((rope or {}).get("rope_theta", rope_theta))
        if _HAS_ROPE_PARAMETERS:
            self.rope_parameters = dict(rope or {"rope_type": "default"}, rope_theta=self.rope_theta)
        else:
            self.rope_scaling = rope
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.tie_word_embeddings = tie_word_embeddings

    @property
    def is_stock_llama(self) -> bool:
        """True when transformers' LlamaForCausalLM computes exactly this model."""
        return self.position_embedding_type == "rope" and self.norm_type == "rmsnorm" and self.hidden_act == "silu"

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.is_stock_llama:
            out["model_type"], out["architectures"] = "llama", ["LlamaForCausalLM"]
        else:
            out["model_type"] = "llamaforge"  # a stock Llama reader must refuse it, not misread it
        return out

    def to_diff_dict(self) -> dict:
        return self.to_dict()  # every field: stock defaults differ from ours (e.g. max_position_embeddings)

    @property
    def rope_factor(self) -> float:
        """Linear Position-Interpolation factor (1.0 = none)."""
        rope = getattr(self, "rope_parameters", None) or getattr(self, "rope_scaling", None) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"rope type {kind!r} is not supported; use 'linear' or none")
        return float(rope.get("factor", 1.0)) if kind == "linear" else 1.0
