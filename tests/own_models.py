"""Deliberately broken copies of examples/my_llama, one bug each: (the check that must catch it,
the edits that plant the bug, the other checks it also fails and why). Used by test_own_model.py."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "my_llama"
MODELING, CONFIGURATION = "modeling_my_llama.py", "configuration_my_llama.py"

BROKEN = {
    "no_causal_mask": ("causal", MODELING, [("mask = (k <= q)[None, None]", "mask = (k >= 0)[None, None]")], {
        "reference": "the stock model is causal: the logits differ",
        "generate": "greedy full forwards see every token of the prompt while the cached steps cannot"}),
    "mask_ignored": ("padding", MODELING, [("    if attention_mask is not None:\n        keys",
                                            "    if False:\n        keys")], {}),
    "heads_split_wrong": ("causal", MODELING, [
        ("q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)",
         "q = self.q_proj(x).view(B, self.n_head, T, self.head_dim)"),
        ("k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)",
         "k = self.k_proj(x).view(B, self.n_kv, T, self.head_dim)"),
        ("v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)",
         "v = self.v_proj(x).view(B, self.n_kv, T, self.head_dim)")], {
        "padding": "a head's rows mix positions, so the padded row's real tokens see the pad tokens' features",
        "reference": "the stock model splits heads correctly",
        "generate": "one token's features are split across heads differently with and without the cache"}),
    "unused_up_proj": ("gradients", MODELING, [("F.silu(self.gate_proj(x)) * self.up_proj(x)",
                                                "F.silu(self.gate_proj(x)) * self.gate_proj(x)")], {
        "reference": "the stock MLP multiplies by up_proj"}),
    "detached_mlp": ("gradients", MODELING, [("return x + self.mlp(self.post_attention_layernorm(x))",
                                              "return x + self.mlp(self.post_attention_layernorm(x)).detach()")], {}),
    "absolute_positions": ("relative_positions", MODELING, [
        ("        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)\n        self.post_init()",
         "        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)\n"
         "        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)\n        self.post_init()"),
        ("        x = self.embed_tokens(input_ids)  # (B, T, hidden)",
         "        x = self.embed_tokens(input_ids) + self.wpe(position_ids)"),
        ("        q, k = rotate(q, position_ids, self.theta, self.factor), rotate(k, position_ids, self.theta, self.factor)\n",
         "")], {
        "position_interpolation": "scaled positions index other rows of the table (the RoPE factor is never read)"}),
    "init_std_1": ("initial_loss", MODELING, [("mean=0.0, std=self.config.initializer_range", "mean=0.0, std=1.0")], {}),
    "field_not_saved": ("round_trip", CONFIGURATION, [("        self.rms_norm_eps = rms_norm_eps\n", ""),
                                                      ("    model_type = \"my_llama\"\n",
                                                       "    model_type = \"my_llama\"\n    rms_norm_eps = 1e-5\n")], {
        "reference": "the model runs with the class's eps (1e-5) where the stock model gets the given 1e-6"}),
}

# Valid models in another shape: `reference` must say what differs, not call them wrong.
VALID = {
    "interleaved_rope": (MODELING, [  # Meta's original layout: pairs (2i, 2i+1)
        ("angles = torch.cat((angles, angles), dim=-1)[:, None]", "angles = angles.repeat_interleave(2, dim=-1)[:, None]"),
        ("x1, x2 = x.float().chunk(2, dim=-1)", "x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]"),
        ("torch.cat((-x2, x1), dim=-1) * angles.sin()", "torch.stack((-x2, x1), dim=-1).flatten(-2) * angles.sin()")]),
    "feed_forward_names": (MODELING, [("self.mlp = MLP(config)", "self.feed_forward = MLP(config)"),
                                      ("self.mlp(self.post_attention_layernorm(x))",
                                       "self.feed_forward(self.post_attention_layernorm(x))")]),
}


def write_broken(name: str, root: Path) -> Path:
    """ROOT/NAME: the example's two files with bug NAME (or valid variant NAME) planted; each edit
    must apply exactly once."""
    file, edits = BROKEN[name][1:3] if name in BROKEN else VALID[name]
    out = root / name
    shutil.copytree(EXAMPLE, out, ignore=shutil.ignore_patterns("__pycache__"))
    text = (out / file).read_text()
    for old, new in edits:
        assert text.count(old) == 1, (name, old)
        text = text.replace(old, new)
    (out / file).write_text(text)
    return out
