"""E2E-QP: scales-only training through QuantLinear's autograd Function, resume, instruction data, DDP."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from eqat_kernels import QuantLinear
from eqat_train import data, evaluate
from eqat_train.checkpoint import load_quantized
from eqat_train.e2e_qp import DEFAULT_NORM_LR_SCALE, E2EConfig, E2ETrainer, kl_loss_sum, token_loss_sum
from eqat_train.examples import IGNORE, Examples, collate
from eqat_train.configs import RunConfig
from eqat_train.pipeline import e2e

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _windows(tokenizer, n_eval=4):
    w = data.tokenize_windows(tokenizer, data.load_text(None), 32)
    return w[:n_eval], w[n_eval:n_eval + 16]


def test_e2e_trains_only_scales_and_lowers_held_out_loss(tiny_packed_dir):
    model, tok = load_quantized(tiny_packed_dir, dtype=torch.float32)
    held_out, train = _windows(tok)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    ppl0 = evaluate.perplexity(model, held_out, progress=False)
    log = E2ETrainer(model, Examples.from_windows(train), E2EConfig(steps=24, lr=2e-3, loss="ce", norm_lr_scale=0.0),
                     bf16=False).train(False)
    ppl1 = evaluate.perplexity(model, held_out, progress=False)
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith(".scales") for n in changed), sorted(changed)[:5]
    assert len(changed) == sum(isinstance(m, QuantLinear) for m in model.modules())
    assert all(after[n].dtype == torch.float16 for n in changed)  # stored format keeps fp16 scales
    assert log[-1]["loss"] < log[0]["loss"]
    assert ppl1 < ppl0, (ppl0, ppl1)


def test_e2e_at_2_bits_trains_the_scales_and_the_norm_weights_only(tiny_packed_dir):
    model, tok = load_quantized(tiny_packed_dir, dtype=torch.float32)  # 2-bit: norms train by default
    held_out, train = _windows(tok)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    trainer = E2ETrainer(model, Examples.from_windows(train), E2EConfig(steps=16, lr=2e-3, loss="ce"), bf16=False)
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(trainer.optimizer.param_groups[0]["lr"]
                                                                    * DEFAULT_NORM_LR_SCALE[2])
    log = trainer.train(False)
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    norms = {n for n in changed if "norm" in n}
    assert norms and all(n.endswith("norm.weight") for n in norms)
    assert changed - norms == {n for n in before if n.endswith(".scales")}
    assert not any(p.requires_grad for p in model.parameters())  # frozen again after training
    assert log[-1]["loss"] < log[0]["loss"]


def test_default_steps_are_one_pass_over_the_examples(tiny_packed_dir):
    model, tok = load_quantized(tiny_packed_dir, dtype=torch.float32)
    _, train = _windows(tok)  # 16 windows
    trainer = E2ETrainer(model, Examples.from_windows(train), E2EConfig(grad_accum=2, batch_size=2, loss="ce"),
                         bf16=False)
    assert trainer.steps == 4 and trainer.settings()["steps"] == 4
    log = trainer.train(False)
    assert len(log) == 4
    seen = sorted(i for step in range(4) for i in trainer.global_batch_indices(step))
    assert seen == list(range(16))  # every window once
    assert E2ETrainer(model, Examples.from_windows(train), E2EConfig(steps=7, loss="ce"), bf16=False).steps == 7


def _dense_model_with_leaf_scales(folder):
    """The checkpoint as a dense model computing W_hat = (q - z) * s from leaf scale tensors, so plain
    autograd gives ds: the independent reference for the fused Function's gradients."""
    dense, _ = load_quantized(folder, dtype=torch.float32)
    scales = {}
    for name, m in list(dense.named_modules()):
        if isinstance(m, QuantLinear):
            def expand(s, m=m):
                return s.repeat_interleave(m.spec.group, 0)[:m.in_features].t()
            cmz = (m.dequantize(torch.float64) / expand(m.scales.double())).round().float()  # integer q - z
            s = m.scales.detach().float().clone().requires_grad_(True)
            scales[f"{name}.scales"] = s
            m.forward = (lambda cmz, s, expand: lambda x: torch.nn.functional.linear(x, cmz * expand(s)))(cmz, s, expand)
    return dense, scales


def test_scale_gradients_match_a_dense_dequantized_model(tiny_packed_dir):
    """ds through the fused Function equals autograd through W_hat = (q - z) * s built densely."""
    model, tok = load_quantized(tiny_packed_dir, dtype=torch.float32)
    _, train = _windows(tok)
    batch = collate(Examples.from_windows(train), [0, 1])
    trainer = E2ETrainer(model, Examples.from_windows(train), E2EConfig(steps=1, loss="ce"), bf16=False)
    loss, _ = token_loss_sum(model, batch)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in trainer.scales.items()}

    dense, scales = _dense_model_with_leaf_scales(tiny_packed_dir)
    loss2, _ = token_loss_sum(dense, batch)
    loss2.backward()
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-5)
    for name, s in scales.items():
        torch.testing.assert_close(fused[name], s.grad, rtol=1e-3, atol=1e-6 * s.grad.abs().max().item())


def test_kl_distillation_gradients_match_autograd_through_a_dense_model(tiny_packed_dir, tiny_model_dir):
    """The default loss, KL(fp || quantized) over the vocabulary at every position: its scale gradients
    through the fused Function equal autograd through a dense W_hat = (q - z) * s, and the fp teacher
    gives it zero loss when compared with itself."""
    from eqat_train.models import load_model

    teacher, _, _ = load_model(str(tiny_model_dir))
    model, tok = load_quantized(tiny_packed_dir, dtype=torch.float32)
    _, train = _windows(tok)
    batch = collate(Examples.from_windows(train), [0, 1])
    trainer = E2ETrainer(model, Examples.from_windows(train), E2EConfig(steps=1), teacher=teacher, bf16=False)
    loss, count = kl_loss_sum(model, teacher, batch)
    assert count == 2 * 31 and loss.item() > 0
    loss.backward()
    fused = {n: p.grad.clone() for n, p in trainer.scales.items()}

    dense, scales = _dense_model_with_leaf_scales(tiny_packed_dir)
    with torch.no_grad():
        t_logits = teacher(batch["input_ids"]).logits[:, :-1].double().log_softmax(-1)
    q_logits = dense(batch["input_ids"]).logits[:, :-1].double().log_softmax(-1)
    loss2 = (t_logits.exp() * (t_logits - q_logits)).sum()  # written out, independent of token_kl
    loss2.backward()
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-4)
    for name, s in scales.items():
        torch.testing.assert_close(fused[name], s.grad, rtol=1e-3, atol=1e-5 * s.grad.abs().max().item())
    assert kl_loss_sum(teacher, teacher, batch)[0].abs().item() < 1e-4
    with pytest.raises(ValueError, match="distils from the fp model"):
        E2ETrainer(model, Examples.from_windows(train), E2EConfig(steps=1))


def test_bf16_autocast_runs_forward_and_backward_in_bf16_close_to_fp32(tiny_packed_dir):
    model, tok = load_quantized(tiny_packed_dir, dtype=torch.float32)
    _, train = _windows(tok)
    batch = collate(Examples.from_windows(train), [0])
    trainer = E2ETrainer(model, Examples.from_windows(train), E2EConfig(steps=1, loss="ce"))
    grads = []
    for bf16 in (False, True):
        for p in trainer.scales.values():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = token_loss_sum(model, batch)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.scales.values()]))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.98, cos


def test_instruction_examples_train_on_response_tokens_only(tmp_path):
    from helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "What is a list?", "response": "A mutable sequence."}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Name a loop."},
                                               {"role": "assistant", "content": "for"},
                                               {"role": "user", "content": "Another?"},
                                               {"role": "assistant", "content": "while"}]}) + "\n")
    ex = Examples.from_instructions(path, tok, max_len=128)
    assert len(ex) == 2
    assert tok.decode(ex.labels[0][ex.labels[0] != IGNORE]) == " A mutable sequence.\n<eos>"
    assert tok.decode(ex.labels[1][ex.labels[1] != IGNORE]) == " for\n<eos> while\n<eos>"
    assert "What is a list?" in tok.decode(ex.input_ids[0]) and (ex.labels[0][:3] == IGNORE).all()
    batch = collate(ex, [0, 1])
    assert batch["attention_mask"].sum() == sum(len(x) for x in ex.input_ids)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()

    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ex = Examples.from_instructions(path, tok, max_len=128)
    assert tok.decode(ex.labels[1][ex.labels[1] != IGNORE]) == "for<eos>while<eos>"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no response"}) + "\n")
    with pytest.raises(ValueError, match="needs 'prompt' and 'response'"):
        Examples.from_instructions(bad, tok)


def test_e2e_on_instruction_data_end_to_end(tiny_packed_dir, tmp_path):
    path = tmp_path / "sft.jsonl"
    topics = [("list", "A mutable sequence."), ("tuple", "An immutable sequence."), ("dict", "A mapping."),
              ("set", "An unordered collection of unique items.")]
    path.write_text("".join(json.dumps({"prompt": f"What is a {k}?", "response": v}) + "\n" for k, v in topics))
    out = tmp_path / "sft"
    res = e2e(str(tiny_packed_dir), RunConfig(out=str(out), seq_len=32, calib_windows=8, eval_windows=4,
                                              eval_texts=["stdlib"]),
              E2EConfig(steps=6, grad_accum=2, lr_scale=50, instruct=str(path)), progress=False)
    assert res["e2e"][-1]["loss"] < res["e2e"][0]["loss"]
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["eqat"]["stages"] == ["rtn", "e2e_qp"] and q["eqat"]["e2e_qp"]["instruct"] == str(path)
    load_quantized(out, dtype=torch.float32)


def _e2e_cmd(src, out, *extra):
    return ["-m", "eqat_train.cli", "e2e", str(src), "--out", str(out), "--seq-len", "32", "--calib-windows", "8",
            "--eval-windows", "4", "--eval-texts", "--no-bf16", "--lr-scale", "50", *extra]


def test_kill_9_during_e2e_then_rerun_matches(tiny_packed_dir, tmp_path):
    args = ["--steps", "40", "--grad-accum", "2", "--save-every", "1", "--norm-lr-scale", "4"]  # norms resume too
    reference = tmp_path / "uninterrupted"
    subprocess.run([sys.executable, *_e2e_cmd(tiny_packed_dir, reference, *args)], env=ENV, check=True, capture_output=True)
    out = tmp_path / "killed"
    progress = out.with_name(out.name + ".partial") / "e2e_progress.json"
    proc = subprocess.Popen([sys.executable, *_e2e_cmd(tiny_packed_dir, out, *args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if 3 <= json.loads(progress.read_text())["step"] < 30:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()
    rerun = subprocess.run([sys.executable, *_e2e_cmd(tiny_packed_dir, out, *args)], env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tiny_packed_dir, tmp_path):
    """torchrun + gloo, 2 ranks x 1 micro-batch vs 1 rank x 2 accumulated micro-batches: same global batch."""
    common = ["--steps", "6", "--batch-size", "1"]
    single, double = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *_e2e_cmd(tiny_packed_dir, single, *common, "--grad-accum", "2")],
                   env=ENV, check=True, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *_e2e_cmd(tiny_packed_dir, double, *common, "--grad-accum", "1")],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = json.loads((single / "eqat_results.json").read_text()), json.loads((double / "eqat_results.json").read_text())
    la, lb = [r["loss"] for r in a["e2e"]], [r["loss"] for r in b["e2e"]]
    assert la == pytest.approx(lb, rel=1e-5)
    start = load_file(tiny_packed_dir / "model.safetensors")
    sa, sb = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    moved = 0
    for key in sa:
        if key.endswith(".scales"):
            torch.testing.assert_close(sa[key].float(), sb[key].float(), rtol=2e-3, atol=0)
            moved += int(not torch.equal(sa[key], start[key]))
    assert moved > 0
