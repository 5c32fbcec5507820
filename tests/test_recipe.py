"""The training recipe: Muon (torch.optim.Muon) + AdamW, warmup-stable-decay, derived micro-batches,
exact continuation of a WSD run past its planned length, and the optimizer/schedule in the card."""

import copy

import pytest
import torch

from helpers import free_port, muon_params, muon_split_worker, stories_data
from llamaforge.config import load_config, micro_batch_for
from llamaforge.errors import UserError
from llamaforge.runs import checkpoints, read_metrics
from llamaforge.train.loop import check_runnable
from llamaforge.train import optim, precision
from llamaforge.train.optim import MuonWithAdamW, build_optimizer
from llamaforge.train.schedules import build_scheduler, decay_start, lr_factor
from llamaforge.train.step import train_step
from llamaforge.workflows.pretrain import pretrain

MICRO = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=2",
         "model.num_key_value_heads=1", "model.max_position_embeddings=64", "train.seq_len=32", "train.batch_tokens=256",
         "train.eval_tokens=512", "train.warmup_steps=2", "train.sample_prompt=The", "train.precision=fp32",
         "train.eval_every=0", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    stories_data(root, 400)
    return root / "d"


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["type"] == "train"}


def _t(**kw):
    return load_config(overrides=[f"train.{k}={v}" for k, v in kw.items()]).train


def test_wsd_warms_up_holds_then_decays_to_the_floor():
    t = _t(warmup_steps=10, max_steps=100, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    f = [lr_factor(s, t) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in f[10:80])  # stable: a longer run continues from here unchanged
    assert f[80] < 1.0 and f[99] == pytest.approx(0.0) and all(a > b for a, b in zip(f[80:], f[81:]))
    assert decay_start(t) == 80 and decay_start(_t(max_steps=100, schedule="cosine")) is None
    sqrt = lr_factor(89, _t(warmup_steps=10, max_steps=100, min_lr_ratio=0.0, schedule="wsd", decay_shape="1-sqrt"))
    assert sqrt == pytest.approx(1 - 0.5 ** 0.5) and sqrt < lr_factor(89, t)


def test_micro_batch_is_derived_when_not_given():
    cfg = load_config(overrides=["train.seq_len=1024", "train.batch_tokens=4096"])
    assert cfg.train.micro_batch is None and micro_batch_for(cfg.train) == 4  # extend --batch-tokens 4096 runs
    cfg = load_config(overrides=["train.seq_len=256", "train.batch_tokens=524288"])
    assert micro_batch_for(cfg.train) == 32 and micro_batch_for(cfg.train, world=8) == 32  # capped at 8192 tokens
    cfg = load_config(overrides=["train.seq_len=256", "train.batch_tokens=6144"])  # 24 sequences: largest divisor <= 32
    assert micro_batch_for(cfg.train) == 24 and micro_batch_for(cfg.train, world=2) == 12
    explicit = load_config(overrides=["model.max_position_embeddings=1024", "train.seq_len=1024", "train.batch_tokens=4096",
                                        "train.micro_batch=8"])
    with pytest.raises(UserError, match="leave train.micro_batch out"):
        check_runnable(explicit, explicit.model, 1)


def test_muon_with_fsdp_is_refused_and_bad_choices_too():
    cfg = load_config(overrides=["train.optimizer=muon", "train.fsdp=true"])
    with pytest.raises(UserError, match="Muon needs whole matrices"):
        check_runnable(cfg, cfg.model, 2)
    with pytest.raises(UserError, match="train.decay_fraction"):
        load_config(overrides=["train.decay_fraction=0"])
    for bad, known in (("train.optimizer=sgd", "adamw, muon"), ("train.schedule=linear", "cosine, wsd"),
                       ("train.decay_shape=cos", "linear, 1-sqrt")):  # the registries refuse, naming what they know
        cfg = load_config(overrides=[bad, "train.schedule=wsd"] if "decay_shape" in bad else [bad])
        with pytest.raises(UserError, match=f"{bad.split('=')[0]} .* is not one of {known}"):
            check_runnable(cfg, cfg.model, 1)


def _muon_pair(ns_dtype):
    """torch.optim.Muon and ours on copies of the same tall, wide and square matrices."""
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 40), (24, 24)]
    a = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=0.02, weight_decay=0.01, momentum=0.95, adjust_lr_fn="original")
    return a, b, torch.optim.Muon(a, **kw), optim.Muon(b, ns_dtype=ns_dtype, **kw), g


@pytest.mark.torchcompat
def test_our_muon_is_torchs_muon_with_newton_schulz_in_the_fast_dtype():
    """bf16 Newton-Schulz: bit for bit torch.optim.Muon (update, LR adjustment, momentum, state dict);
    fp32: the same update within bf16's rounding. Fails if torch changes Muon's internals."""
    for dtype in (torch.bfloat16, torch.float32):
        a, b, theirs, ours, g = _muon_pair(dtype)
        for _ in range(3):
            for p, q in zip(a, b):
                p.grad = torch.randn(p.shape, generator=g)
                q.grad = p.grad.clone()
            theirs.step()
            ours.step()
        for p, q in zip(a, b):
            if dtype == torch.bfloat16:
                assert torch.equal(p, q)
            else:
                assert not torch.equal(p, q)
                torch.testing.assert_close(q, p, rtol=0, atol=2e-3)
        sa, sb = theirs.state_dict(), ours.state_dict()
        assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
        theirs.load_state_dict(sb)  # the state dicts are interchangeable


def test_muon_shares_newton_schulz_over_ranks_out_by_cost_and_gathers_it_exactly(tmp_path):
    """2 gloo processes, each orthogonalizing its share of the matrices: parameters and state dict
    equal (bit for bit) to one process doing all of them, in fp32 and bf16, one matrix at a time and
    batched (the GPU's way: each rank stacks its share's same-shape matrices)."""
    assert optim.owners([(64, 64), (8, 8), (8, 8), (32, 32)], 2) == [0, 1, 1, 1]  # 262k vs 33k + 1k + 1k
    assert sorted(set(optim.owners([(4, 4)] * 6, 3))) == [0, 1, 2]
    cases = [(dtype, batched, str(tmp_path / f"{dtype}-{batched}.pt"))
             for dtype, batched in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True))]
    torch.multiprocessing.spawn(muon_split_worker, args=(2, free_port(), cases), nprocs=2)  # one launch for all
    for ns_dtype, batched, out in cases:
        *split, state = torch.load(out)
        params, opt, gen = muon_params(ns_dtype, batched=batched)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        for p, q in zip(params, split):
            assert torch.equal(p.detach(), q)
        for k, v in opt.state_dict()["state"].items():
            assert torch.equal(v["momentum_buffer"], state["state"][k]["momentum_buffer"])


def test_batched_newton_schulz_is_the_same_update_and_skips_on_the_device(monkeypatch):
    """Same-shape matrices (a tall one as its transpose) stacked: the same momentum bit for bit, the
    same parameters within the rounding of the Newton-Schulz dtype; a step flagged found_inf changes
    nothing; the GPU batches, the CPU does not (benchmarks muon_ns measured it slower here)."""
    assert optim.same_shapes([(48, 16), (16, 40), (24, 24), (40, 16), (16, 48)]) == [[0, 4], [1, 3], [2]]
    assert optim.same_shapes([(8, 8)] * 5 + [(4, 4)], limit=128) == [[0, 1], [2, 3], [4], [5]]  # stacks bounded
    assert optim.batch_newton_schulz(torch.device("cuda", 0)) and not optim.batch_newton_schulz(torch.device("cpu"))
    real, sizes = optim.newton_schulz, []
    monkeypatch.setattr(optim, "newton_schulz", lambda g, *a: (sizes.append(len(g) if g.dim() == 3 else 1), real(g, *a))[1])
    params, opt, _ = muon_params(torch.float32, batched=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # (48,16), (16,40), (8,8) alone; the three (24,24); (40,8) with (8,40) as its transpose
    assert sorted(sizes) == [1, 1, 1, 2, 3], sizes
    monkeypatch.undo()
    for ns_dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-3)):
        (one, opt_one, gen), (many, opt_many, _) = muon_params(ns_dtype), muon_params(ns_dtype, batched=True)
        for step in range(3):
            for p, q in zip(one, many):
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = p.grad.clone()
            if step == 2:  # a non-finite gradient: skipped on the device by both
                before = [q.detach().clone() for q in many]
                opt_one.found_inf = opt_many.found_inf = torch.ones(())
            opt_one.step()
            opt_many.step()
        assert all(torch.equal(b, q.detach()) for b, q in zip(before, many))
        for p, q in zip(one, many):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=atol)
        for k, v in opt_one.state_dict()["state"].items():
            assert torch.equal(v["momentum_buffer"], opt_many.state_dict()["state"][k]["momentum_buffer"])


def test_newton_schulz_runs_in_the_dtype_the_hardware_is_fast_in(monkeypatch, small_model):
    cpu = torch.device("cpu")
    for flags, want in (({"avx2"}, torch.float32), ({"avx2", "avx512_bf16"}, torch.bfloat16),
                        ({"amx_bf16"}, torch.bfloat16)):
        monkeypatch.setattr(precision, "cpu_flags", lambda f=flags: f)
        assert optim.ns_dtype_for(cpu) == want
        assert optim.ns_dtype_for(cpu, "fp32") == torch.float32 and optim.ns_dtype_for(cpu, "bf16") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    model = small_model()
    assert build_optimizer(model, lr=1e-3, kind="muon").muon.ns_dtype == torch.float32
    with pytest.raises(UserError, match="muon_ns_dtype"):
        load_config(overrides=["train.muon_ns_dtype=fp8"])


def test_muon_takes_the_blocks_matrices_and_resumes_exactly(small_model):
    model = small_model()
    opt = build_optimizer(model, lr=1e-3, kind="muon")
    assert isinstance(opt, MuonWithAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon) == (".layers." in name and p.dim() == 2), name  # embeddings, head, norms: AdamW
    x = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(0))
    batch = [(x[:, :-1], x[:, 1:])]

    def run(m, o, s, n):
        out = []
        for _ in range(n):
            out.append(train_step(m, o, batch).loss)
            s.step()
        return out

    sched = build_scheduler(opt, _t(warmup_steps=1, max_steps=6, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.5))  # the resumed steps decay the LR
    first = run(model, opt, sched, 3)
    assert first[-1] < first[0]  # it learns
    saved = copy.deepcopy((sched.state_dict(), model.state_dict(), opt.state_dict()))  # live tensors otherwise
    straight = run(model, opt, sched, 3)
    fresh = small_model(seed=1)
    fresh.load_state_dict(saved[1])
    opt2 = build_optimizer(fresh, lr=1e-3, kind="muon")
    sched2 = build_scheduler(opt2, _t(warmup_steps=1, max_steps=6, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.5))  # the loop's order: scheduler, then the states
    opt2.load_state_dict(saved[2])
    sched2.load_state_dict(saved[0])
    assert run(fresh, opt2, sched2, 3) == straight  # bit-exact: momentum buffers and the LR schedule restored
    assert [g["lr"] for g in opt2.muon.param_groups] == [g["lr"] for g in opt.muon.param_groups] != [0.02]
    with pytest.raises(ValueError, match="Muon"):
        opt2.load_state_dict(build_optimizer(fresh, lr=1e-3).state_dict())  # an AdamW run's state


def test_wsd_run_continues_past_its_planned_length_exactly_and_the_card_says_so(data, tmp_path):
    """A Muon + WSD run of 8 steps keeps the checkpoint where its decay starts (step 6); a new run
    continuing from it with 12 steps gives, step for step, the losses of a straight 12-step run."""
    recipe = [*MICRO, "train.optimizer=muon", "train.schedule=wsd", "train.decay_fraction=0.25", "train.min_lr_ratio=0",
              "train.save_every=2", "train.keep_last=1"]
    short, longer, straight = tmp_path / "short", tmp_path / "longer", tmp_path / "straight"
    pretrain(load_config("tiny", overrides=[*recipe, "train.max_steps=8"]), data, short, progress=False)
    names = [p.name for p in checkpoints(short)]
    assert names == ["step_6", "step_8"] and (short / "checkpoints" / "step_6" / "PINNED").exists()  # kept by rotation
    pretrain(load_config("tiny", overrides=[*recipe, "train.max_steps=12", "train.decay_fraction=0.5"]), data, straight,
             progress=False)
    cont = load_config("tiny", overrides=[*recipe, "train.max_steps=12", "train.decay_fraction=0.5",
                                          f"train.resume_from={short / 'checkpoints' / 'step_6'}"])
    pretrain(cont, data, longer, progress=False)
    want, got = losses(straight), losses(longer)
    assert sorted(got) == list(range(1, 13))  # the source run's first 6 steps are copied into the new run's metrics
    assert [got[s] for s in range(1, 13)] == [want[s] for s in range(1, 13)]
    assert losses(short)[8] != want[8]  # the short run decayed at steps 7-8: different updates
    card = (straight / "final" / "README.md").read_text()
    assert "Muon for the blocks' matrices" in card and "warmup-stable-decay" in card
    started = [r for r in read_metrics(straight) if r.get("event") == "started"][0]
    assert "Muon" in started["recipe"] and started["micro_batch"] == 8
    # the Muon-trained folder is still a stock Llama: transformers' own class gives our logits
    from transformers import LlamaForCausalLM

    from llamaforge.model.io import load_model

    ids = torch.randint(3, 32000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = LlamaForCausalLM.from_pretrained(straight / "final").eval()(ids).logits
        torch.testing.assert_close(load_model(straight / "final")(ids).logits, stock, rtol=0, atol=1e-4)


def test_resume_from_a_missing_checkpoint_is_one_line(data, tmp_path):
    cfg = load_config("tiny", overrides=[*MICRO, "train.max_steps=2", f"train.resume_from={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match="no such checkpoint folder"):
        pretrain(cfg, data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
