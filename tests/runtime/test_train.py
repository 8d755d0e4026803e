"""The training path: MTP / balancing additions to the model, data and tokenizer, exact resume, spike handling."""
import dataclasses
import math

import numpy as np
import pytest
import sentencepiece
import torch

from dslocal.gui import cli
from dslocal.runtime import data, train
from dslocal.runtime.model import DeepSeek, init_weights, sequence_balance_loss

# 2 layers (1 dense + 1 MoE) + 1 MTP layer, 4 experts: a few ms per step
TINY = dataclasses.replace(train.PRESETS["nano"], name="test", hidden=64, n_layer=2, n_head=2, kv_lora_rank=32,
                           qk_nope_dim=16, qk_rope_dim=16, v_head_dim=16, dense_ffn=128, n_expert=4,
                           expert_ffn=32, n_mtp=1)
TC = train.TrainConfig(steps=6, batch=4, seq_len=32, lr=3e-3, warmup=2, eval_every=3, eval_batches=1,
                       ckpt_every=2, log_every=1, balance_weight=1e-3, bias_speed=1e-2)


@pytest.fixture(scope="module")
def corpus():
    docs, chats = data.generate_corpus(600, 200, seed=3)
    texts = docs + [m["content"] for c in chats for m in c["messages"]]
    vocab = data.vocab_metadata(data.train_tokenizer(texts, 400))
    tok, template = data.tokenizer_from_metadata(vocab)
    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size)
    return dict(docs=docs, chats=chats, vocab=vocab, tok=tok, template=template, cfg=cfg,
                stream=data.text_stream(tok, docs), sp=texts)


def test_forward_train_main_head_is_the_inference_forward(corpus):
    torch.manual_seed(0)
    model = DeepSeek(corpus["cfg"], mtp=True)
    init_weights(model)
    model.eval()
    w = torch.randint(0, corpus["cfg"].vocab_size, (2, 12))
    with torch.no_grad():
        outs = model.forward_train(w)
        want = model(w[:, :10])
    assert len(outs) == 2 and outs[1].shape == want.shape
    assert torch.equal(outs[0], want)


def test_sequence_balance_loss_is_one_when_balanced_and_grows_when_not():
    E, K, T = 4, 2, 8
    probs = torch.full((T, E), 0.5)
    ids = torch.tensor([[0, 1], [2, 3]] * (T // 2))
    balanced = sequence_balance_loss(probs, ids, 1, K).item()
    skewed = sequence_balance_loss(torch.tensor([[0.9, 0.9, 0.1, 0.1]]).repeat(T, 1),
                                   torch.tensor([[0, 1]] * T), 1, K).item()
    print(f"balance loss: balanced {balanced:.3f}, skewed {skewed:.3f}")
    assert balanced == pytest.approx(1.0)
    assert skewed == pytest.approx(1.8)     # f = (2, 2, 0, 0), P = (0.45, 0.45, 0.05, 0.05)


def test_bias_update_lowers_overloaded_and_raises_underloaded_experts(corpus):
    model = DeepSeek(corpus["cfg"])
    router = model.moe_layers()[0].router
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]), 0.01)
    assert router.bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])


def test_tokenizer_matches_sentencepiece(corpus):
    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(data.train_tokenizer(corpus["sp"], 400))
    texts = corpus["docs"][:50] + ["Hello, wörld! 12 + 345 = 357.", "深度求索 émoji 🙂 tabs\tand  spaces", " x"]
    for t in texts:
        assert corpus["tok"].encode(t, add_bos=False, special=False) == sp.encode(t), t
        assert corpus["tok"].decode(sp.encode(t)) == t


def test_sft_masks_only_assistant_turns(corpus):
    tok, template = corpus["tok"], corpus["template"]
    msgs = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "12 + 30 = 42."},
            {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]
    ids, mask = data.chat_tokens(tok, template, msgs)
    assert ids == template.encode(tok, msgs, add_generation_prompt=False)
    answer = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(answer, special=False) == "12 + 30 = 42.You are welcome."
    assert sum(mask) == len(answer) and tok.eos_id in answer and not mask[0]


def test_held_out_additions_never_in_training_data():
    docs, chats = data.generate_corpus(300, 300, seed=5)
    text = "\n".join(docs) + "\n".join(m["content"] for c in chats for m in c["messages"])
    for _, q, _ in data.held_out_questions(40):
        if q.startswith("What is"):
            a, b = q.removeprefix("What is ").rstrip("?").split(" + ")
            assert f"{a} + {b} =" not in text


def _run(corpus, tmp_path, tc=TC, resume=False, on_step=None):
    return train.train(corpus["cfg"], tc, corpus["stream"], corpus["stream"], corpus["vocab"], str(tmp_path),
                       resume=resume, on_step=on_step)


class Killed(Exception):
    pass


def test_resume_is_exact(corpus, tmp_path):
    torch.set_num_threads(1)
    full = _run(corpus, tmp_path / "full")

    def kill(step, loss):
        if step == 5:             # after step 5; the last checkpoint is the one of step 4
            raise Killed
    with pytest.raises(Killed):
        _run(corpus, tmp_path / "cut", on_step=kill)
    assert train.load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))["state"]["step"] == 4
    resumed = _run(corpus, tmp_path / "cut", resume=True)
    print("losses", [h[1] for h in full.history])
    assert [h[1] for h in resumed.history] == [h[1] for h in full.history]      # bitwise
    assert resumed.history == full.history
    a = train.load_checkpoint(str(tmp_path / "full" / "ckpt.pt"))["model"]
    b = train.load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.history[-1][1] < full.history[0][1]
    # the selection bias moved (auxiliary-loss-free balancing) and is saved
    assert a["layers.1.ffn.router.bias"].abs().sum() > 0


def test_nan_step_is_skipped_and_repeated_spikes_roll_back_then_stop(corpus, tmp_path, monkeypatch):
    real = train.window_losses
    calls = {"n": 0, "poison": set()}

    def poisoned(model, window, mask):
        out = real(model, window, mask)
        calls["n"] += 1
        if calls["n"] in calls["poison"] or calls["n"] >= 100:
            out[0] = out[0] * float("nan")
        return out
    monkeypatch.setattr(train, "window_losses", poisoned)
    calls["poison"] = {3}                 # one bad step: skipped, the run goes on
    state = _run(corpus, tmp_path / "one")
    assert state.step == TC.steps and len(state.history) == TC.steps - 1
    assert all(math.isfinite(h[1]) for h in state.history)

    calls["n"], calls["poison"] = 0, set(range(9, 100))   # from the 9th forward on, every loss is NaN
    with pytest.raises(train.TrainingError, match="diverged"):
        _run(corpus, tmp_path / "bad", dataclasses.replace(TC, steps=20, eval_every=100))
    blob = train.load_checkpoint(str(tmp_path / "bad" / "ckpt.pt"))
    assert all(torch.isfinite(v).all() for v in blob["model"].values() if v.is_floating_point())
    assert blob["state"]["step"] <= 8


def test_cli_train_sft_and_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--out", out, "--generate", "400", "--vocab-size", "400", "--batch", "2", "--seq-len", "32",
            "--warmup", "1", "--ckpt-every", "2", "--eval-every", "2", "--eval-batches", "1", "--log-every", "1"]
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text('{"hidden": 64, "n_layer": 2, "n_head": 2, "kv_lora_rank": 32, "qk_nope_dim": 16, '
                        '"qk_rope_dim": 16, "v_head_dim": 16, "dense_ffn": 128, "n_expert": 4, "expert_ffn": 32}')
    assert cli.main(base + ["--config", str(cfg_file), "--steps", "2"]) == 0
    assert cli.main(base + ["--steps", "3"]) == 2           # exists: needs --resume
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main(base + ["--steps", "3", "--resume"]) == 0
    assert train.load_checkpoint(out + "/ckpt.pt")["state"]["step"] == 3
    sft = str(tmp_path / "sft")
    assert cli.main(["train", "--out", sft, "--init", out + "/ckpt.pt", "--sft", "--generate", "400", "--steps", "2",
                     "--batch", "2", "--seq-len", "32", "--eval-batches", "1"]) == 0
    err = capsys.readouterr().err
    assert "max/mean expert load" in err and "tok/s" in err
    blob = train.load_checkpoint(sft + "/ckpt.pt")
    assert blob["cfg"].hidden == 64 and blob["vocab"] == train.load_checkpoint(out + "/ckpt.pt")["vocab"]


def test_flops_per_token_counts_active_experts_only():
    cfg = train.PRESETS["nano"]
    total, active = train.count_params(cfg)
    dense_cfg = dataclasses.replace(cfg, n_expert_used=cfg.n_expert)
    assert train.count_params(dense_cfg)[1] > active and train.count_params(dense_cfg)[0] == total
    f = train.flops_per_token(cfg, 128, with_mtp=False)
    assert f == 6 * active + 6 * cfg.n_layer * cfg.n_head * 128 * (2 * cfg.kv_lora_rank + cfg.qk_rope_dim)
    assert np.isclose(train.lr_at(train.TrainConfig(steps=100, warmup=10), 99), train.TrainConfig.min_lr, rtol=1e-2)
