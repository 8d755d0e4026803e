"""`dslocal train`: train a small DeepSeek-V3-style model with the runtime's own model definition.

MLA, DeepSeekMoE (shared + fine-grained routed experts), auxiliary-loss-free balancing (the router's selection
bias moved after every step from the measured expert load, DeepSeek-V3 section 2.1.2), an optional
sequence-wise balance loss, multi-token prediction (section 2.2), dense leading layers. AdamW, warm-up and
cosine decay, gradient accumulation and clipping, bf16 autocast on a GPU.

Checkpoints (torch.save, written to a temporary name and renamed) hold the model, the optimizer, the step,
the spike detector and the tokenizer (GGUF vocabulary metadata). The learning rate is a function of the step
and each batch is drawn from a generator seeded by the step, so `--resume` continues exactly: a run killed
mid-way and resumed gives the losses of an uninterrupted run, bit for bit on the CPU.

A non-finite or spiking loss skips its step; `max_spikes` in a row roll the run back to the last checkpoint
(with the data shifted), and `max_rollbacks` rollbacks stop it with a message. A checkpoint is never
written with non-finite weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as Fn

from dslocal.quant.gguf_file import ValueType
from dslocal.runtime import data
from dslocal.runtime.config import GATING_SIGMOID, ModelConfig
from dslocal.runtime.model import DeepSeek, init_weights

_ARCH = dict(name="", context_length=512, n_mtp=1, n_head_kv=1, rms_eps=1e-6, mla=True, rope_base=10000.0,
             rope_scaling="linear", rope_factor=1.0, rope_orig_ctx=512, rope_attn_factor=1.0, mscale_all_dim=0.0,
             gating=GATING_SIGMOID, expert_weights_norm=True, expert_weights_scale=1.0, n_group=0,
             n_group_used=0, n_dense_lead=1, qk_rope_dim=32)
PRESETS: dict[str, ModelConfig] = {
    "nano": ModelConfig(**_ARCH | dict(name="dslocal-nano", hidden=256, n_layer=4, n_head=4, vocab_size=1024,
                                       q_lora_rank=0, kv_lora_rank=128, qk_nope_dim=32, v_head_dim=32,
                                       dense_ffn=768, n_expert=8, n_expert_used=2, n_expert_shared=1,
                                       expert_ffn=128)),
    "micro": ModelConfig(**_ARCH | dict(name="dslocal-micro", hidden=512, n_layer=6, n_head=8, vocab_size=8192,
                                        q_lora_rank=256, kv_lora_rank=256, qk_nope_dim=64, v_head_dim=64,
                                        dense_ffn=1536, n_expert=8, n_expert_used=2, n_expert_shared=1,
                                        expert_ffn=256, context_length=1024, rope_orig_ctx=1024)),
    "small": ModelConfig(**_ARCH | dict(name="dslocal-small", hidden=768, n_layer=12, n_head=12,
                                        vocab_size=16384, q_lora_rank=384, kv_lora_rank=256, qk_nope_dim=64,
                                        v_head_dim=64, dense_ffn=2048, n_expert=16, n_expert_used=2,
                                        n_expert_shared=1, expert_ffn=256, context_length=2048,
                                        rope_orig_ctx=2048)),
}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch: int = 16               # sequences per micro-batch
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    mtp_weight: float = 0.3       # multi-token prediction loss weight (depth is the model's n_mtp)
    balance_weight: float = 0.0   # sequence-wise balance loss weight (DeepSeek-V3 uses a very small one)
    bias_speed: float = 1e-3      # auxiliary-loss-free bias update speed (gamma)
    eval_every: int = 100
    eval_batches: int = 4
    ckpt_every: int = 200
    log_every: int = 20
    spike_factor: float = 3.0     # a loss above this many times its running average is a spike
    max_spikes: int = 3
    max_rollbacks: int = 2
    device: str = "cpu"


class TrainingError(RuntimeError):
    """A run that cannot continue (repeated spikes after rollbacks, no checkpoint to roll back to)."""


@dataclass
class State:
    step: int = 0
    loss_avg: float = 0.0         # running average of good losses (spike detection)
    good_steps: int = 0
    spikes: int = 0               # in a row
    rollbacks: int = 0
    data_shift: int = 0           # bumped at each rollback so the bad batches are not drawn again
    history: list = field(default_factory=list)   # (step, train loss, eval loss or None)


# -------------------------------------------------------------------------------------------- accounting
def count_params(cfg: ModelConfig, with_mtp: bool = False) -> tuple[int, int]:
    """(total parameters, parameters used per token excluding the embedding lookup)."""
    model = DeepSeek(cfg, mtp=with_mtp).to("meta")
    total = active = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name == "embed.weight":
            continue
        if name.endswith(("ffn.w_gate", "ffn.w_up", "ffn.w_down")):   # routed experts: K of E per token
            active += p.numel() * cfg.n_expert_used // cfg.n_expert
        else:
            active += p.numel()
    return total, active


def flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool = True) -> float:
    """Training FLOPs per token: 6 N_active + attention 6 L H T (2C + R) (scores over C + R, values over C,
    forward + backward, causal mask not discounted: the PaLM convention)."""
    _, active = count_params(cfg, with_mtp)
    n_blocks = cfg.n_layer + (cfg.n_mtp if with_mtp else 0)
    return 6 * active + 6 * n_blocks * cfg.n_head * seq_len * (2 * cfg.kv_lora_rank + cfg.qk_rope_dim)


def lr_at(tc: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to min_lr at the last step."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


# ----------------------------------------------------------------------------------------------- losses
def window_losses(model: DeepSeek, window: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Masked cross-entropy of the main head, then of each MTP depth. window, mask (B, T + 1 + n_mtp)."""
    logits = model.forward_train(window)
    T = logits[0].shape[1]
    out = []
    for k, lg in enumerate(logits):
        target, m = window[:, k + 1:k + 1 + T], mask[:, k + 1:k + 1 + T].float()
        ce = Fn.cross_entropy(lg.flatten(0, 1), target.flatten(), reduction="none")
        out.append((ce * m.flatten()).sum() / m.sum().clamp_min(1.0))
    return out


def _autocast(tc: TrainConfig):
    on_gpu = tc.device.startswith("cuda")
    return torch.autocast("cuda" if on_gpu else "cpu", dtype=torch.bfloat16, enabled=on_gpu)


@torch.no_grad()
def evaluate(model: DeepSeek, stream: data.TokenStream, tc: TrainConfig) -> float:
    model.eval()
    losses = []
    for i in range(tc.eval_batches):
        w, m = stream.batch(tc.batch, tc.seq_len + 1 + model.cfg.n_mtp, tc.seed + 7919, 0, i)
        with _autocast(tc):
            losses.append(window_losses(model, w.to(tc.device), m.to(tc.device))[0].item())
    model.train()
    return sum(losses) / len(losses)


def expert_load_summary(model: DeepSeek) -> str:
    """Per MoE layer, the busiest expert's load over the mean (1.0 = perfectly balanced)."""
    parts = []
    for moe in model.moe_layers():
        if moe.load is not None and moe.load.sum() > 0:
            parts.append(f"{(moe.load.max() / moe.load.mean()).item():.2f}")
    return "max/mean expert load per MoE layer: " + " ".join(parts)


# ------------------------------------------------------------------------------------------- checkpoint
def save_checkpoint(path: str, model: DeepSeek, opt, state: State, tc: TrainConfig, vocab: list) -> None:
    """Atomically (temporary file + rename); refuses non-finite weights."""
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise TrainingError(f"refusing to write a checkpoint: {name} holds NaN or Inf")
    blob = {"format": "dslocal-train-1", "cfg": dataclasses.asdict(model.cfg), "train": dataclasses.asdict(tc),
            "model": model.state_dict(), "optimizer": opt.state_dict(), "state": dataclasses.asdict(state),
            "vocab": [(k, v, int(t)) for k, v, t in vocab]}
    tmp = path + ".partial"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != "dslocal-train-1":
        raise ValueError(f"{path} is not a dslocal training checkpoint")
    blob["cfg"] = ModelConfig(**blob["cfg"])
    blob["vocab"] = [(k, v, ValueType(t)) for k, v, t in blob["vocab"]]
    return blob


def _optimizer(model: DeepSeek, tc: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)


# ------------------------------------------------------------------------------------------------ train
def train(cfg: ModelConfig, tc: TrainConfig, train_data: data.TokenStream, eval_data: data.TokenStream | None,
          vocab: list, out_dir: str, resume: bool = False, init: dict | None = None,
          on_step: Callable[[int, float], None] | None = None, log=None) -> State:
    """Train for tc.steps optimizer steps; checkpoints go to out_dir/ckpt.pt. init: a checkpoint blob whose
    weights start the run (fine-tuning). on_step(step, loss) is called after each step (tests)."""
    log = log or sys.stderr
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "ckpt.pt")
    torch.manual_seed(tc.seed)
    model = DeepSeek(cfg, mtp=True)
    init_weights(model)
    if init is not None:
        model.load_state_dict(init["model"])
    model.to(tc.device).train()
    for moe in model.moe_layers():
        moe.balance_loss = tc.balance_weight > 0
    opt = _optimizer(model, tc)
    state = State()

    def restore() -> None:
        nonlocal state
        blob = load_checkpoint(ckpt)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        state = State(**blob["state"])

    if resume:
        restore()
        print(f"resumed from {ckpt} at step {state.step}", file=log)
    total, active = count_params(cfg, with_mtp=True)
    window = tc.seq_len + 1 + cfg.n_mtp
    tokens_per_step = tc.batch * tc.seq_len * tc.grad_accum
    print(f"model    {cfg.name}: {cfg.n_layer} layers + {cfg.n_mtp} MTP, hidden {cfg.hidden}, {cfg.n_expert} "
          f"experts ({cfg.n_expert_used} active, {cfg.n_expert_shared} shared), vocab {cfg.vocab_size}; "
          f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token, "
          f"{flops_per_token(cfg, tc.seq_len) / 1e6:.1f} MFLOP per training token", file=log)
    print(f"train    {tc.steps} steps x {tokens_per_step} tokens on {tc.device}; "
          f"{len(train_data)} training tokens", file=log)
    t_start, tokens_done = time.perf_counter(), 0
    while state.step < tc.steps:
        step = state.step
        lr = lr_at(tc, step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for moe in model.moe_layers():
            moe.load = None
        total_loss = 0.0
        for micro in range(tc.grad_accum):
            w, m = train_data.batch(tc.batch, window, tc.seed, step + state.data_shift * 10_000_019, micro)
            with _autocast(tc):
                losses = window_losses(model, w.to(tc.device), m.to(tc.device))
                loss = losses[0]
                if len(losses) > 1:
                    loss = loss + tc.mtp_weight * sum(losses[1:]) / (len(losses) - 1)
                if tc.balance_weight > 0:
                    loss = loss + tc.balance_weight * sum(moe.aux_loss for moe in model.moe_layers())
            (loss / tc.grad_accum).backward()
            total_loss += losses[0].item() / tc.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip).item()
        spike = state.good_steps >= 10 and total_loss > tc.spike_factor * state.loss_avg
        if not math.isfinite(total_loss) or not math.isfinite(grad_norm) or spike:
            state.spikes += 1
            print(f"\nstep {step}: {'loss spike' if spike else 'non-finite loss or gradient'} "
                  f"(loss {total_loss:.4g}, running average {state.loss_avg:.4g}); step skipped", file=log)
            if state.spikes >= tc.max_spikes:
                if state.rollbacks >= tc.max_rollbacks or not os.path.exists(ckpt):
                    raise TrainingError(f"training diverged at step {step}: {state.spikes} bad steps in a row "
                                        f"after {state.rollbacks} rollbacks; lower --lr or raise --warmup")
                rollbacks, shift = state.rollbacks + 1, state.data_shift + 1
                restore()
                state.rollbacks, state.data_shift, state.spikes = rollbacks, shift, 0
                print(f"rolled back to the checkpoint of step {state.step}", file=log)
                continue
            state.step += 1   # the step is spent, its update is not applied
            continue
        opt.step()
        for moe in model.moe_layers():
            moe.router.update_bias(moe.load, tc.bias_speed)
        state.spikes = 0
        state.good_steps += 1
        state.loss_avg = total_loss if state.good_steps == 1 else 0.95 * state.loss_avg + 0.05 * total_loss
        state.step += 1
        tokens_done += tokens_per_step
        eval_loss = None
        if eval_data is not None and (state.step % tc.eval_every == 0 or state.step == tc.steps):
            eval_loss = evaluate(model, eval_data, tc)
        state.history.append((state.step, total_loss, eval_loss))
        elapsed = time.perf_counter() - t_start
        tps = tokens_done / elapsed
        if state.step % tc.log_every == 0 or eval_loss is not None or state.step == tc.steps:
            eta = (tc.steps - state.step) * tokens_per_step / max(tps, 1e-9)
            bar = "#" * int(20 * state.step / tc.steps)
            print(f"[{bar:<20}] step {state.step}/{tc.steps} loss {total_loss:.4f}"
                  + (f" eval {eval_loss:.4f}" if eval_loss is not None else "")
                  + f" lr {lr:.2e} {tps:,.0f} tok/s ETA {eta / 60:.1f} min", file=log)
            print("         " + expert_load_summary(model), file=log)
        if state.step % tc.ckpt_every == 0 or state.step == tc.steps:
            save_checkpoint(ckpt, model, opt, state, tc, vocab)
        if on_step is not None:
            on_step(state.step, total_loss)
    return state


# ----------------------------------------------------------------------------------------------- verb
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (ckpt.pt, config.json)")
    p.add_argument("--preset", choices=list(PRESETS), default="nano")
    p.add_argument("--config", metavar="FILE", help="JSON with ModelConfig fields overriding the preset")
    p.add_argument("--data", nargs="*", default=[], metavar="FILE",
                   help="training text: .txt (blank-line separated documents) or .jsonl ({'text'} / {'messages'})")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="add N procedurally generated documents (stories, arithmetic) and N/4 dialogues")
    p.add_argument("--sft", action="store_true",
                   help="supervised fine-tuning: train on the chat dialogues, loss on assistant turns only")
    p.add_argument("--init", metavar="CKPT", help="start from this checkpoint's weights and tokenizer")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--eval-fraction", type=float, default=0.02)
    p.add_argument("--vocab-size", type=int, help="tokenizer size (default: the preset's)")
    p.add_argument("--mtp", type=int, help="multi-token prediction depth (default: the preset's, 1)")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--threads", type=int, help="torch CPU threads")


def build_streams(args, tok, template) -> tuple[data.TokenStream, data.TokenStream]:
    docs, chats = data.read_texts(args.data)
    if args.generate:
        gen_docs, gen_chats = data.generate_corpus(args.generate, args.generate // 4, seed=args.seed)
        docs, chats = docs + gen_docs, chats + gen_chats
    if args.sft:
        if not chats:
            raise ValueError("--sft needs chat data: a .jsonl with 'messages' in --data, or --generate")
        tr, ev = data.split(chats, args.eval_fraction)
        return data.chat_stream(tok, template, tr), data.chat_stream(tok, template, ev)
    if not docs:
        raise ValueError("no training text: give --data FILE... or --generate N")
    tr, ev = data.split(docs, args.eval_fraction)
    return data.text_stream(tok, tr), data.text_stream(tok, ev)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    ckpt = os.path.join(args.out, "ckpt.pt")
    init = None
    if args.resume:
        blob = load_checkpoint(ckpt)
        cfg, vocab = blob["cfg"], blob["vocab"]
    elif args.init:
        init = load_checkpoint(args.init)
        cfg, vocab = init["cfg"], init["vocab"]
    else:
        if os.path.exists(ckpt):
            raise ValueError(f"{ckpt} exists; pass --resume to continue it or choose another --out")
        cfg = PRESETS[args.preset]
        if args.config:
            with open(args.config) as fh:
                cfg = dataclasses.replace(cfg, **json.load(fh))
        if args.mtp is not None:
            cfg = dataclasses.replace(cfg, n_mtp=args.mtp)
        docs, chats = data.read_texts(args.data)
        if args.generate:
            gd, gc = data.generate_corpus(args.generate, args.generate // 4, seed=args.seed)
            docs, chats = docs + gd, chats + gc
        texts = docs + [m["content"] for c in chats for m in c["messages"]]
        if not texts:
            raise ValueError("no training text: give --data FILE... or --generate N")
        vocab = data.vocab_metadata(data.train_tokenizer(texts, args.vocab_size or cfg.vocab_size))
        n_vocab = len(next(v for k, v, _ in vocab if k == "tokenizer.ggml.tokens"))
        cfg = dataclasses.replace(cfg, vocab_size=n_vocab)
    tok, template = data.tokenizer_from_metadata(vocab)
    train_data, eval_data = build_streams(args, tok, template)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as fh:
        json.dump({"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tc)}, fh, indent=1)
    state = train(cfg, tc, train_data, eval_data, vocab, args.out, resume=args.resume, init=init)
    last = state.history[-1] if state.history else None
    print(f"done: {ckpt}" + (f" (step {last[0]}, loss {last[1]:.4f})" if last else ""), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dslocal train")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
