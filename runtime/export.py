"""`dslocal export`: a training checkpoint -> a deepseek2 GGUF that dslocal and llama.cpp both run.

Tensor names come from weights.gguf_names (the one name table), types from synthetic.choose_type (the
llama-quantize rules, with its fallbacks for rows that are not whole K-quant blocks). The tokenizer is the
checkpoint's SentencePiece vocabulary (tokenizer.ggml.model "llama") with the DeepSeek-V3 chat template.

MTP modules are written by default as llama.cpp lays them out (blk.{n_layer + k}.*, the nextn tensors, and
deepseek2.nextn_predict_layers): llama.cpp then counts them but skips them on load, dslocal's loader ignores
them too, and the file keeps everything a later speculative decoder needs. The shared embedding and head
are not repeated (nextn.embed_tokens / shared_head_head are optional). `--no-mtp` drops them.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

from dslocal.quant.gguf_writer import TensorData, write_gguf
from dslocal.quant.gguf_file import ValueType
from dslocal.quant.quantize import quantize
from dslocal.quant.synthetic import choose_type
from dslocal.runtime.config import ModelConfig, config_metadata, tensor_specs
from dslocal.runtime.train import load_checkpoint
from dslocal.runtime.weights import gguf_names

FILE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k", "q6_k", "q4_k_m")


def checkpoint_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor], mtp: bool) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 values in the GGUF numpy shape, for the main layers and (mtp) the MTP
    modules, which llama.cpp numbers after the main layers."""
    n_all = cfg.n_layer + (cfg.n_mtp if mtp else 0)
    names = gguf_names(dataclasses.replace(cfg, n_layer=n_all, n_mtp=0))
    out: dict[str, np.ndarray] = {}

    def param(pname: str) -> str:
        """The checkpoint name of layer i >= n_layer: the block inside MTP module i - n_layer."""
        if pname.startswith("layers."):
            i = int(pname.split(".")[1])
            if i >= cfg.n_layer:
                return f"mtp.{i - cfg.n_layer}.block." + pname.split(".", 2)[2]
        return pname

    for pname, gname in names.items():
        out[gname] = state[param(pname)].float().numpy()
    for i in range(n_all):
        p = param(f"layers.{i}.attn.")
        out[f"blk.{i}.attn_k_b.weight"] = state[p + "wk_b"].float().numpy().transpose(0, 2, 1)   # (H, C, N)
        out[f"blk.{i}.attn_v_b.weight"] = state[p + "wv_b"].float().numpy()                     # (H, Vh, C)
    for k in range(n_all - cfg.n_layer):
        g, p = f"blk.{cfg.n_layer + k}.nextn.", f"mtp.{k}."
        out |= {g + "eh_proj.weight": state[p + "eh_proj.weight"].float().numpy(),
                g + "enorm.weight": state[p + "enorm.weight"].float().numpy(),
                g + "hnorm.weight": state[p + "hnorm.weight"].float().numpy(),
                g + "shared_head_norm.weight": state[p + "norm.weight"].float().numpy()}
    return out


def export(ckpt_path: str, out_path: str, ftype: str = "q8_0", mtp: bool = True, name: str | None = None) -> None:
    if ftype not in FILE_TYPES:
        raise ValueError(f"--type must be one of {', '.join(FILE_TYPES)}")
    blob = load_checkpoint(ckpt_path)
    cfg: ModelConfig = blob["cfg"]
    if not cfg.mla:
        raise ValueError("export writes MLA files (split attn_k_b / attn_v_b); the checkpoint's config has mla=False")
    has_mtp = mtp and cfg.n_mtp > 0 and any(k.startswith("mtp.") for k in blob["model"])
    cfg = dataclasses.replace(cfg, n_mtp=cfg.n_mtp if has_mtp else 0, name=name or cfg.name)
    values = checkpoint_tensors(cfg, blob["model"], has_mtp)
    tensors = []
    for spec in tensor_specs(cfg):            # llama.cpp's order; optional tensors we do not have are skipped
        if spec.name not in values:
            if spec.required:
                raise ValueError(f"the checkpoint has no weights for {spec.name}")
            continue
        v = values.pop(spec.name)
        if v.shape != spec.shape:
            raise ValueError(f"{spec.name}: the checkpoint holds shape {v.shape}, the config implies {spec.shape}")
        t = choose_type(spec.name, spec.shape, ftype, cfg.n_layer)
        tensors.append(TensorData(spec.name, spec.shape, t, lambda v=v, t=t: [quantize(v, t)]))
    if values:
        raise ValueError(f"tensors with no place in the GGUF: {sorted(values)[:4]}")
    metadata = config_metadata(cfg) + blob["vocab"]
    metadata.append(("general.file_type", _FILE_TYPE[ftype], ValueType.UINT32))
    write_gguf(out_path, metadata, tensors)


# llama_ftype values (llama.h) written as general.file_type
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k": 14, "q4_k_m": 15, "q6_k": 18, "bf16": 32}


def measure(path: str, n: int = 100, log=None) -> dict[str, float]:
    """Greedy answers of a GGUF chat model to n held-out generated questions (data.held_out_questions):
    the share per kind (two-digit addition, story Q&A) whose answer contains the expected text."""
    from dslocal.runtime.data import held_out_questions
    from dslocal.runtime.load import RunConfig, load
    from dslocal.runtime.sampling import Sampling
    loaded = load(path, RunConfig(context=512), log=log or sys.stderr)
    right: dict[str, list[int]] = {}
    for kind, question, expected in held_out_questions(n):
        loaded.engine.reset()
        ids = loaded.template.encode(loaded.engine.tokenizer, [{"role": "user", "content": question}])
        answer = "".join(p.text for p in loaded.engine.generate(ids, Sampling(temperature=0, max_tokens=24)))
        right.setdefault(kind, []).append(expected in answer)
    return {kind: sum(v) / len(v) for kind, v in right.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a training checkpoint (RUN/ckpt.pt)")
    p.add_argument("output", help="the GGUF file to write")
    p.add_argument("--type", default="q8_0", choices=FILE_TYPES, help="weight type (default q8_0)")
    p.add_argument("--no-mtp", action="store_true", help="leave the multi-token prediction layers out")
    p.add_argument("--name", help="general.name (default: the checkpoint's)")
    p.add_argument("--eval", type=int, default=0, metavar="N",
                   help="then answer N held-out generated questions and print the accuracy")


def run(args: argparse.Namespace) -> int:
    export(args.checkpoint, args.output, args.type, mtp=not args.no_mtp, name=args.name)
    print(f"wrote {args.output}", file=sys.stderr)
    if args.eval:
        for kind, acc in measure(args.output, args.eval).items():
            print(f"held-out {kind} accuracy: {acc:.1%}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dslocal export")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
