"""Fidelity metrics and self-generated calibration data on a tiny model."""
import copy
import json

import pytest
import torch

from eqat_train import data, fidelity, models, selfgen
from eqat_train.checkpoint import load_quantized
from eqat_train.selfgen import SelfGenConfig, generate_calibration

CHATML = ("{% for m in messages %}<eos>{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
          "{% if add_generation_prompt %}<eos>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, _ = models.load_model(str(tiny_model_dir))
    return model, tok


def test_a_model_compared_with_itself_has_zero_kl_and_full_agreement(tiny):
    model, tok = tiny
    windows = torch.randint(0, len(tok), (3, 24), generator=torch.Generator().manual_seed(0))
    r = fidelity.compare_on_windows(model, copy.deepcopy(model), windows, progress=False)
    assert r.kl == pytest.approx(0.0, abs=1e-6) and r.top1 == 1.0 and r.ppl_ratio == pytest.approx(1.0)
    prompts = [windows[i, :8] for i in range(3)]
    fp_tokens = fidelity.greedy_tokens(model, prompts, 6)
    assert fidelity.greedy_agreement(model, fp_tokens, prompts) == 6


def test_several_models_share_one_fp_pass_with_the_same_numbers(tiny_packed_dir, tiny):
    fp, tok = tiny
    quantized, _ = load_quantized(tiny_packed_dir, dtype=torch.float32)
    windows = torch.randint(0, len(tok), (3, 24), generator=torch.Generator().manual_seed(2))
    together = fidelity.compare_many([quantized, copy.deepcopy(fp)], fp, windows, progress=False)
    alone = fidelity.compare_on_windows(quantized, fp, windows, progress=False)
    assert together[0].as_dict() == pytest.approx(alone.as_dict(), rel=1e-5)
    assert together[1].kl == pytest.approx(0.0, abs=1e-6) and together[1].top1 == 1.0


def test_batched_greedy_equals_one_prompt_at_a_time(tiny):
    """Left padding must not change a prompt's continuation (prompts of different lengths in one batch)."""
    model, tok = tiny
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, len(tok), (n,), generator=g) for n in (3, 9, 6)]
    batched = fidelity.greedy_batch(model, prompts, 7)
    for prompt, row in zip(prompts, batched):
        assert row == fidelity.greedy_batch(model, [prompt], 7)[0]


def test_kl_is_the_full_vocabulary_divergence():
    """token_kl against an independent fp64 sum over the vocabulary."""
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    pp, qq = p.double().softmax(-1), q.double().softmax(-1)
    expected = (pp * (pp / qq).log()).sum(-1)
    assert torch.allclose(fidelity.token_kl(p, q).double(), expected, atol=1e-5)
    assert (fidelity.token_kl(p, p).abs() < 1e-6).all()


def test_kl_gradient_matches_autograd_across_chunks():
    """The chunked KL's closed-form gradient (softmax(q) - softmax(fp), per position) against autograd
    through the written-out fp64 expression, with more positions than one chunk and a random upstream grad."""
    g = torch.Generator().manual_seed(2)
    rows = fidelity.KL_CHUNK_ROWS * 2 + 13
    p, q = torch.randn(2, rows, 37, generator=g) * 3, torch.randn(2, rows, 37, generator=g) * 3
    upstream = torch.rand(2, rows, generator=g)
    qr = q.clone().requires_grad_()
    (fidelity.token_kl(p, qr) * upstream).sum().backward()
    qd = q.double().requires_grad_()
    lp, lq = p.double().log_softmax(-1), qd.log_softmax(-1)
    ((lp.exp() * (lp - lq)).sum(-1) * upstream.double()).sum().backward()
    torch.testing.assert_close(qr.grad.double(), qd.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        fidelity.token_kl(p, q[:, :-1])


def test_quantized_model_report(tiny_packed_dir, tiny):
    fp, tok = tiny
    model, _ = load_quantized(tiny_packed_dir, dtype=torch.float32)
    rep = fidelity.report(model, fp, tok, ["stdlib"], 32, 3, calibration="stdlib", progress=False)
    row = rep["texts"]["stdlib"]
    assert row["kl"] > 0 and 0 <= row["top1"] <= 1 and row["calibrated_on"] is True
    assert 0 <= rep["greedy_agreement"] <= rep["greedy_tokens"] and len(rep["chat"]) == len(fidelity.CHAT_QUESTIONS)
    assert "(calibrated on)" in fidelity.format_table(rep)


def test_evaluation_and_calibration_overlap_is_named(tiny_model_dir, tmp_path, capsys):
    assert data.overlapping_texts("self+stdlib", ["stdlib", "fortunes", "code"]) == ["stdlib"]
    assert data.overlapping_texts("self", ["stdlib", "code"]) == []
    from helpers import run_quantize

    run_quantize(model=str(tiny_model_dir), out=str(tmp_path / "o"), method="rtn", bits=4, group_size=32,
                             seq_len=32, calib_windows=2, val_windows=0, eval_windows=2, eval_texts=["stdlib"],
                             text="stdlib", fidelity=False, e2e=None)
    assert "WARNING: evaluation text(s) ['stdlib'] are also calibration sources" in capsys.readouterr().err


def test_self_generated_calibration_is_cached_resumable_and_tied_to_its_model(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = CHATML
    cfg = SelfGenConfig(sequences=5, seq_len=16, batch_size=2, user_tokens=6, answer_tokens=12, chat_fraction=0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real_plain = selfgen.plain_batch
    calls = []

    def killed_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # a kill after the first batch was saved
        calls.append(1)
        return real_plain(*args, **kwargs)

    monkeypatch.setattr(selfgen, "plain_batch", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        generate_calibration(model, tok, cfg, cache_dir=tmp_path / "a", progress=False)
    monkeypatch.setattr(selfgen, "plain_batch", real_plain)
    resumed = generate_calibration(model, tok, cfg, cache_dir=tmp_path / "a", progress=False)
    fresh = generate_calibration(model, tok, cfg, cache_dir=tmp_path / "b", progress=False)
    assert resumed.shape == (5, 16) and torch.equal(resumed, fresh)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the fp model is untouched
    header = selfgen.user_header(tok)
    stream = fresh.flatten().tolist()
    assert any(stream[i:i + len(header)] == header for i in range(len(stream)))  # conversations are in there
    folder = next((tmp_path / "a").iterdir())
    assert not list(folder.glob("*.tmp")) and not list(folder.glob("plain_*")) and not list(folder.glob("chat_*"))

    monkeypatch.setattr(selfgen, "plain_batch", lambda *a, **k: pytest.fail("a cached set is not regenerated"))
    assert torch.equal(generate_calibration(model, tok, cfg, cache_dir=tmp_path / "a", progress=False), fresh)
    meta = json.loads((folder / "meta.json").read_text())
    meta["model"] = "another-model"
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="calibration data of another model"):
        generate_calibration(model, tok, cfg, cache_dir=tmp_path / "a", progress=False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.norm.weight.add_(1.0)
    assert selfgen.model_fingerprint(other) != selfgen.model_fingerprint(model)  # other weights, other cache


def test_gumbel_top_k_draws_the_top_k_softmax_at_its_temperature():
    cfg = SelfGenConfig(sequences=1, seq_len=8, top_k=3, temperature=0.7)
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0, -4.0]])
    pick = selfgen.GumbelTopK(cfg, torch.Generator().manual_seed(0))
    draws = 40_000
    scores = pick(None, logits.expand(draws, -1).clone())
    assert torch.isinf(scores).sum(-1).eq(logits.shape[-1] - 1).all()  # greedy then takes the drawn token
    counts = torch.bincount(scores.argmax(-1), minlength=logits.shape[-1]).double() / draws
    top = logits[0].topk(3).indices
    expected = torch.zeros(logits.shape[-1], dtype=torch.float64)
    expected[top] = (logits[0, top].double() / 0.7).softmax(-1)
    assert counts[expected == 0].sum() == 0  # never outside the top k
    assert (counts - expected).abs().max() < 0.01  # 40k draws: standard error < 0.0025


def test_later_chat_batches_sample_only_the_conversations_still_needed():
    cfg = SelfGenConfig(sequences=68, seq_len=512)  # the default run: 34 chat windows
    need = 34 * 512
    assert selfgen.chat_rows(cfg, 0, need, 0) == cfg.batch_size  # nothing known yet: a whole batch
    # the first batch of 64 gave 17,063 tokens (33.3 windows): the last 345 tokens take a few conversations
    rows = selfgen.chat_rows(cfg, 17_063, need, 64)
    assert selfgen.CHAT_ROWS_MIN <= rows < 8
    assert rows * 17_063 / 64 >= need - 17_063  # enough at the mean length
    assert selfgen.chat_rows(cfg, 1_000, need, 64) == cfg.batch_size  # short conversations: never past a batch


def test_self_generation_window_counts_follow_the_chat_share():
    cfg = SelfGenConfig(sequences=132, seq_len=512)  # the default run: 66 plain would leave a batch of 2
    assert selfgen.window_counts(cfg, chat=True) == (64, 68)
    assert selfgen.window_counts(SelfGenConfig(sequences=132, seq_len=512, chat_fraction=0.25), chat=True) == (99, 33)
    assert selfgen.window_counts(SelfGenConfig(sequences=132, seq_len=512, chat_fraction=0.0), chat=True) == (132, 0)
    assert selfgen.window_counts(cfg, chat=False) == (132, 0)
    assert selfgen.window_counts(SelfGenConfig(sequences=40, seq_len=512), chat=True) == (20, 20)


def test_run_sampling_settings_reach_self_generation(tiny, monkeypatch):
    """--gen-temperature / --gen-top-k / --gen-chat-fraction become the SelfGenConfig that draws (and keys the cache
    of) the set."""
    from eqat_train.configs import RunConfig

    seen = []
    monkeypatch.setattr(selfgen, "generate_calibration",
                        lambda model, tok, cfg, progress=True: seen.append(cfg) or torch.zeros(cfg.sequences, 16,
                                                                                               dtype=torch.long))
    run = RunConfig(gen_temperature=1.7, gen_top_k=7, gen_chat_fraction=0.25)
    data.calibration_split("self", *tiny, 16, 2, 3, 1, sampling=run.sampling)
    assert (seen[0].temperature, seen[0].top_k, seen[0].chat_fraction, seen[0].sequences) == (1.7, 7, 0.25, 4)
    data.calibration_split("self", *tiny, 16, 2, 3, 1)
    assert (seen[1].temperature, seen[1].top_k, seen[1].chat_fraction) == (
        SelfGenConfig.temperature, SelfGenConfig.top_k, SelfGenConfig.chat_fraction)
