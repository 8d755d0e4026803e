"""`dslocal info FILE`: what a deepseek2 GGUF holds and what one generated token costs to read."""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections import defaultdict

from dslocal.quant.ggml import SUPPORTED
from dslocal.offload import hotness
from dslocal.offload.planner import Budget, Hardware, ModelShape, format_plan, parse_size, plan
from dslocal.quant.gguf_file import GGUFFile, open_gguf
from dslocal.runtime.config import ModelConfig, check_tensors, read_config


def describe(f: GGUFFile) -> dict:
    """A JSON-ready summary of a deepseek2 GGUF; raises GGUFError for a file dslocal cannot run."""
    cfg = read_config(f)
    specs = check_tensors(cfg, f)

    by_type: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    by_part: dict[str, int] = defaultdict(int)
    unsupported = []
    for t in f.tensors.values():
        by_type[t.ggml_type.name]["tensors"] += 1
        by_type[t.ggml_type.name]["bytes"] += t.nbytes
        by_part[specs[t.name].part] += t.nbytes
        if t.ggml_type not in SUPPORTED:
            unsupported.append({"tensor": t.name, "type": t.ggml_type.name})

    tokens = f.get("tokenizer.ggml.tokens")
    return {
        "file": f.path,
        "file_bytes": f.file_size,
        "gguf_version": f.version,
        "architecture": f.get("general.architecture"),
        "name": cfg.name,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "layers": {"total": cfg.n_layer, "dense": cfg.n_layer - cfg.n_layer_moe, "moe": cfg.n_layer_moe,
                   "mtp": cfg.n_mtp},
        "experts": {"routed": cfg.n_expert, "active": cfg.n_expert_used, "shared": cfg.n_expert_shared},
        "context_length": cfg.context_length,
        "tokenizer": {"model": f.get("tokenizer.ggml.model"), "pre": f.get("tokenizer.ggml.pre"),
                      "vocab_size": len(tokens) if tokens is not None else None,
                      "bos_id": f.get("tokenizer.ggml.bos_token_id"),
                      "eos_id": f.get("tokenizer.ggml.eos_token_id")},
        "chat_template": f.get("tokenizer.chat_template") is not None,
        "tensor_count": len(f.tensors),
        "parameters": sum(t.n_values for t in f.tensors.values()),
        "bytes_by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
        "bytes_by_part": dict(sorted(by_part.items(), key=lambda kv: -kv[1])),
        "unsupported_tensors": unsupported,
        "decode_bytes_per_token": decode_bytes_per_token(cfg, f),
    }


def decode_bytes_per_token(cfg: ModelConfig, f: GGUFFile) -> dict:
    """Weight bytes one generated token reads: the K routed experts of each MoE layer, and the rest.

    The routed part is what the CPU side must stream from DRAM per token (DESIGN.md, the performance
    model); the rest (attention, shared experts, dense layers, output) is read in full every token.
    The token embedding is a row lookup and MTP layers do not run in plain decoding, so neither counts.
    """
    routed = 0
    for i in range(cfg.n_layer):
        if cfg.is_moe_layer(i):
            for kind in ("gate", "up", "down"):
                routed += f.tensors[f"blk.{i}.ffn_{kind}_exps.weight"].nbytes // cfg.n_expert * cfg.n_expert_used
    other = 0
    for t in f.tensors.values():
        if t.name == "token_embd.weight" or "_exps." in t.name:
            continue
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= cfg.n_layer:
            continue
        other += t.nbytes
    if "output.weight" not in f.tensors:
        other += f.tensors["token_embd.weight"].nbytes   # tied output head
    return {"routed_experts": routed, "other_weights": other}


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def format_text(d: dict) -> str:
    c = d["config"]
    lines = [
        f"file          {d['file']}  ({_gb(d['file_bytes'])}, GGUF v{d['gguf_version']})",
        f"model         {d['name'] or '(unnamed)'}  [{d['architecture']}]  {d['parameters'] / 1e9:.3f}B parameters",
        f"layers        {d['layers']['total']} ({d['layers']['dense']} dense, {d['layers']['moe']} MoE"
        + (f", +{d['layers']['mtp']} MTP" if d['layers']['mtp'] else "") + ")",
        f"experts       {d['experts']['routed']} routed, {d['experts']['active']} active, "
        f"{d['experts']['shared']} shared; gating {'sigmoid' if c['gating'] == 2 else 'softmax'}"
        + (f", {c['n_group']} groups (top {c['n_group_used']})" if c['n_group'] > 1 else ""),
        f"attention     MLA: {c['n_head']} heads, q_lora {c['q_lora_rank'] or 'none'}, kv_lora {c['kv_lora_rank']}, "
        f"qk {c['qk_nope_dim']}+{c['qk_rope_dim']}, v {c['v_head_dim']}, "
        + ("split k_b/v_b" if c['mla'] else "fused kv_b"),
        f"dimensions    hidden {c['hidden']}, dense ffn {c['dense_ffn']}, expert ffn {c['expert_ffn']}, "
        f"vocab {c['vocab_size']}",
        f"context       {d['context_length']} tokens; rope {c['rope_scaling']}"
        + (f" x{c['rope_factor']:g} (orig {c['rope_orig_ctx']})" if c['rope_scaling'] == 'yarn' else ""),
        f"tokenizer     {d['tokenizer']['model']} ({d['tokenizer']['pre']}), "
        f"{d['tokenizer']['vocab_size']} tokens; chat template {'yes' if d['chat_template'] else 'no'}",
        f"tensors       {d['tensor_count']}",
    ]
    for name, t in d["bytes_by_type"].items():
        lines.append(f"  {name:<11} {t['tensors']:>5} tensors  {_gb(t['bytes']):>12}")
    lines.append("bytes by part  " + ", ".join(f"{k} {_gb(v)}" for k, v in d["bytes_by_part"].items()))
    per_tok = d["decode_bytes_per_token"]
    lines.append(f"per token     routed experts read {_gb(per_tok['routed_experts'])}, "
                 f"other weights {_gb(per_tok['other_weights'])}")
    if d["unsupported_tensors"]:
        kinds = sorted({u["type"] for u in d["unsupported_tensors"]})
        lines.append(f"UNSUPPORTED   {len(d['unsupported_tensors'])} tensors of type {', '.join(kinds)}: "
                     "dslocal cannot run this file yet")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a deepseek2 GGUF file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--gpu-memory", metavar="SIZE",
                   help="show the placement plan for this GPU budget: 12GiB or 12G (2^30 bytes), 12GB (10^9)")
    p.add_argument("--ctx", type=int, default=4096, help="context tokens the plan holds KV cache for (4096, at most the model's)")
    p.add_argument("--cpu-only", action="store_true", help="show the plan with everything on the CPU")
    p.add_argument("--gpu-experts", type=int, metavar="N", help="plan exactly N routed experts per layer on the GPU")


def _budget(args: argparse.Namespace) -> Budget | None:
    """The plan's budget from the flags, or None when no plan was asked for."""
    if args.gpu_memory is None and not args.cpu_only:
        if args.gpu_experts is not None:
            raise ValueError("--gpu-experts needs --gpu-memory")
        return None
    gpu_bytes = 0 if args.gpu_memory is None else parse_size(args.gpu_memory)
    return Budget(gpu_bytes=gpu_bytes, context=args.ctx, cpu_only=args.cpu_only, gpu_experts=args.gpu_experts)


def run(args: argparse.Namespace) -> int:
    budget = _budget(args)   # a bad size is refused before the file is read
    placement = None
    with open_gguf(args.file) as f:
        try:
            d = describe(f)
            if budget is not None:
                # `info` plans for the budget given and does not look at this machine's GPU (no torch import)
                cfg = read_config(f)
                budget = dataclasses.replace(budget, context=min(budget.context, cfg.context_length))
                budget = dataclasses.replace(budget, hotness=hotness.for_model(args.file, cfg))
                placement = plan(ModelShape.from_gguf(f, cfg), Hardware(), budget)
        except ValueError as e:
            raise type(e)(f"{args.file}: {e}") from None
    if args.json:
        if placement is not None:
            d["plan"] = dataclasses.asdict(placement)
        print(json.dumps(d, indent=2))
    else:
        print(format_text(d) + ("\n" + format_plan(placement) if placement is not None else ""))
    return 0
