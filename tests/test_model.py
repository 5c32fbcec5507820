"""The model against transformers' own Llama, component by component and whole."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from llamaforge.model.convert import from_llama, to_llama
from llamaforge.model.hf.modeling_llamaforge import MLP, RMSNorm, apply_rope, rope_cos_sin


@pytest.mark.compat
@pytest.mark.parametrize("tied,factor,kv", [(False, 1.0, 2), (True, 4.0, 2), (False, 2.0, 4), (True, 1.0, 1)])
def test_logits_match_transformers_llama(small_model, ids, tied, factor, kv):
    model = small_model(tie_word_embeddings=tied, num_key_value_heads=kv)
    if factor != 1.0:
        model.config.rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": 10000.0}
    llama = to_llama(model)
    assert llama.config.rope_parameters.get("factor", 1.0) == factor
    with torch.no_grad():
        diff = (model(ids).logits - llama(ids).logits).abs().max().item()
    assert diff <= 1e-4
    back = from_llama(llama)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_rmsnorm_matches_reference_and_formula():
    x = torch.randn(3, 5, 64)
    ours, ref = RMSNorm(64, 1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    formula = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * ours.weight
    torch.testing.assert_close(ours(x), formula)
    torch.testing.assert_close(ours(x), ref(x))
    # a bf16 model normalizes in fp32 and returns bf16, close to the fp32 result
    y = ours.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), formula, atol=0.05, rtol=0.02)


def test_rope_matches_the_rotation_formula():
    """Pair (i, i + d/2) at position m is rotated by m * theta^(-2i/d) / factor."""
    B, H, T, d, theta, factor = 1, 2, 7, 8, 10000.0, 2.0
    x = torch.randn(B, H, T, d)
    pos = torch.arange(T)[None]
    cos, sin = rope_cos_sin(pos, d, theta, factor, torch.float32)
    got = apply_rope(x, cos, sin)
    want = torch.empty_like(x)
    for m in range(T):
        for i in range(d // 2):
            a = m / factor * theta ** (-2 * i / d)
            x1, x2 = x[..., m, i], x[..., m, i + d // 2]
            want[..., m, i] = x1 * math.cos(a) - x2 * math.sin(a)
            want[..., m, i + d // 2] = x1 * math.sin(a) + x2 * math.cos(a)
    torch.testing.assert_close(got, want)
    # relative: q.k depends only on the distance between positions
    q, k = torch.randn(d), torch.randn(d)
    pos = torch.tensor([[3, 5, 13, 15]])
    c, s = rope_cos_sin(pos, d, theta, 1.0, torch.float32)
    r = apply_rope(torch.stack([q, k, q, k])[None, None], c, s)[0, 0]
    torch.testing.assert_close(r[0] @ r[1], r[2] @ r[3])


def test_swiglu_matches_llama_mlp(small_model):
    cfg = small_model().config
    ours = MLP(cfg)
    ref = LlamaMLP(LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size))
    ref.load_state_dict(ours.state_dict())  # the same names
    x = torch.randn(2, 3, cfg.hidden_size)
    torch.testing.assert_close(ours(x), ref(x))


def test_init_scales_residual_projections(small_model):
    m = small_model(hidden_size=256, intermediate_size=512, num_hidden_layers=8, vocab_size=2048)
    layer = m.model.layers[0]
    assert abs(layer.self_attn.q_proj.weight.std().item() - 0.02) < 0.002
    want = 0.02 / math.sqrt(2 * 8)
    assert abs(layer.self_attn.o_proj.weight.std().item() - want) < 0.001
    assert abs(layer.mlp.down_proj.weight.std().item() - want) < 0.001
    assert torch.equal(layer.post_attention_layernorm.weight, torch.ones(256))


def test_loss_normalizes_per_token_over_accumulated_micro_batches(small_model, ids):
    m = small_model()
    labels = ids.clone()
    labels[0, :100] = -100  # uneven numbers of targets in the two micro-batches
    full = m(ids, labels=labels).loss
    n = (labels[:, 1:] != -100).sum()
    parts = sum(m(ids[i : i + 1], labels=labels[i : i + 1], num_items_in_batch=n).loss for i in range(2))
    torch.testing.assert_close(parts, full)
    # shift_labels (already next-token targets) gives the same loss as labels
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    torch.testing.assert_close(m(ids, shift_labels=shifted).loss, full)


@pytest.mark.compat
def test_kv_cache_greedy_equals_recompute(small_model):
    m = small_model()
    prompt = torch.randint(3, 512, (1, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    cached = m.generate(prompt, use_cache=True, **kw)
    fresh = m.generate(prompt, use_cache=False, **kw)
    assert cached.shape[1] == 29
    assert torch.equal(cached, fresh)


@pytest.mark.compat
def test_left_padded_batch_generates_like_each_prompt_alone(small_model):
    m = small_model()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=g) for n in (4, 11, 7)]
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    alone = [m.generate(p[None], **kw)[0, len(p):] for p in prompts]
    T = max(len(p) for p in prompts)
    batch = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):], mask[i, T - len(p):] = p, 1
    out = m.generate(batch, attention_mask=mask, **kw)[:, T:]
    for i in range(3):
        assert torch.equal(out[i], alone[i])


def test_bad_config_is_refused():
    from llamaforge.model.hf.configuration_llamaforge import LlamaForgeConfig

    with pytest.raises(ValueError, match="divisible"):
        LlamaForgeConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="divide"):
        LlamaForgeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_training_loss_matches_plain_cross_entropy(small_model, ids, tied):
    """Training mode uses the chunked head + loss; values and gradients equal lm_head + F.cross_entropy."""
    from llamaforge.model.hf.modeling_llamaforge import linear_cross_entropy

    m = small_model(tie_word_embeddings=tied)
    targets = ids.roll(-1, 1)
    targets[0, :37] = -100
    m.train()
    fused = m(ids, shift_labels=targets, num_items_in_batch=300).loss
    fused.backward()
    g_fused = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    m.eval()
    logits = m(ids).logits
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                              reduction="sum") / 300
    plain.backward()
    torch.testing.assert_close(fused, plain)
    for k, p in m.named_parameters():
        torch.testing.assert_close(g_fused[k], p.grad, atol=1e-6, rtol=1e-4)
    h = torch.randn(5, 8, 16)
    w = torch.randn(50, 16)
    t = torch.randint(0, 50, (5, 8))
    torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk=7),
                               torch.nn.functional.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten()))


def _needs_inductor():
    from llamaforge.train.compiling import inductor_problem

    problem = inductor_problem(torch.device("cpu"))
    if problem:
        pytest.skip(f"torch.compile cannot build CPU kernels here: {problem}")


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_loss_chunks_give_the_eager_loss_and_gradients(autocast):
    """The fused head + loss with its per-chunk math compiled (train.compile_loss): the same loss and
    the same, non-zero gradients as eager, in fp32 and under bf16 autocast (one head cast for all
    chunks), with ignored targets and a short last chunk."""
    from llamaforge.model.hf.modeling_llamaforge import linear_cross_entropy

    _needs_inductor()
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(3, 50, 32, generator=g), torch.randn(300, 32, generator=g) * 0.1
    t = torch.randint(0, 300, (3, 50), generator=g)
    t[1, :20] = -100
    out = []
    for compiled in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = linear_cross_entropy(h, w, t, num_items_in_batch=130, chunk=64, compiled=compiled)
        loss.backward()
        out.append((loss.detach(), h.grad, w.grad))
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, **tol)
    assert out[1][1].abs().sum() > 0 and out[1][2].abs().sum() > 0


def test_the_compiled_loss_chunk_is_one_graph_for_every_remainder():
    """SFT's padded widths give a new last-chunk length each step: padded to the chunk size with
    ignored rows, every length reuses one graph (dynamo's counters), with the eager loss."""
    from torch._dynamo.utils import counters

    from llamaforge.model.hf import modeling_llamaforge as mf

    _needs_inductor()
    torch._dynamo.reset()
    mf._COMPILED_CHUNK.clear()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 32, generator=g) * 0.1
    for rows in (70, 75, 81, 90):  # chunk 64: remainders 6, 11, 17, 26
        h, t = torch.randn(1, rows, 32, generator=g), torch.randint(0, 300, (1, rows), generator=g)
        with torch.no_grad():
            got = mf.linear_cross_entropy(h, w, t, chunk=64, compiled=True)
            want = mf.linear_cross_entropy(h, w, t, chunk=64, compiled=False)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_a_whole_compiled_model_trains_with_the_eager_gradients(small_model, ids):
    """Regression for the CUDA failure (torch.compile turned the fused loss's gradients into zeros):
    the whole model under torch.compile, its fused loss eager or with compiled chunks, gives eager's
    loss and non-zero gradients for every parameter. Runs wherever inductor runs."""
    _needs_inductor()
    targets = ids.roll(-1, 1)
    ref = small_model()
    ref.train()
    ref(ids, shift_labels=targets).loss.backward()
    for compiled_loss in (False, True):
        m = small_model()
        m.train()
        m.compiled_loss = compiled_loss
        loss = torch.compile(m)(ids, shift_labels=targets).loss
        loss.backward()
        for (k, p), q in zip(m.named_parameters(), ref.parameters()):
            assert p.grad is not None and p.grad.abs().sum() > 0, k
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("card, capability, dtype, masked, native", [
    ("T4", (7, 5), torch.float16, False, False), ("V100", (7, 0), torch.float16, False, False),
    ("A10", (8, 6), torch.bfloat16, False, True), ("L4", (8, 9), torch.bfloat16, False, True),
    ("A100", (8, 0), torch.bfloat16, False, True), ("H100", (9, 0), torch.bfloat16, False, True),
    ("H200", (9, 0), torch.float16, False, True), ("H100 padded", (9, 0), torch.bfloat16, True, False),
    ("H100 fp32", (9, 0), torch.float32, False, False),
])
def test_gqa_runs_natively_only_where_the_flash_kernel_takes_it(card, capability, dtype, masked, native):
    from llamaforge.model.hf.modeling_llamaforge import gqa_flash

    assert gqa_flash(capability, dtype, masked) is native


def test_expanded_kv_gives_the_native_gqa_logits(small_model, ids, monkeypatch):
    """The path T4/V100 and padded batches take (K/V expanded to every head) computes the same model."""
    from llamaforge.model.hf import modeling_llamaforge as mf

    model = small_model(num_attention_heads=4, num_key_value_heads=2)
    mask = torch.ones_like(ids[:, :64])
    mask[1, :5] = 0
    with torch.no_grad():
        native = [model(ids[:, :64]).logits, model(ids[:, :64], attention_mask=mask).logits]
        monkeypatch.setattr(mf, "native_gqa", lambda q, m: False)
        expanded = [model(ids[:, :64]).logits, model(ids[:, :64], attention_mask=mask).logits]
    for a, b in zip(native, expanded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
