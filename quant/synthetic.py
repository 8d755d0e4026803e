"""Random-weight deepseek2 GGUF files of any shape: tiny ones for tests, real-sized ones for benchmarks.

Two ways to fill the weights:
- "quantize": Gaussian weights (std 1/sqrt(fan-in)) quantized with dslocal's quantizers. Exact and slow;
  for small models, where tests compare against references.
- "blocks": random quantized blocks written directly, with their scale fields patched so the dequantized
  weights have the same std. A pool of blocks is drawn once per type and sliced at random offsets, so a
  10 GB file costs about what the disk needs to write it.

Hot experts: real routers are skewed. With `hot_fraction > 0` every token embedding gets a common
direction u and the router rows of a random subset of experts per layer get +skew * u, so those experts
win top-k more often, as in real models. The rest of the model is unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Iterator

import numpy as np

from dslocal.quant.dequant import dequantize
from dslocal.quant.ggml import TYPE_INFO, GGMLType, parse_type
from dslocal.quant.gguf_writer import TensorData, write_gguf
from dslocal.quant.quantize import quantize
from dslocal.quant.vocab import V2_CHAT_TEMPLATE, V3_CHAT_TEMPLATE, synthetic_vocab
from dslocal.runtime.config import GATING_SIGMOID, GATING_SOFTMAX, ModelConfig, config_metadata, tensor_specs

T = GGMLType

_COMMON = dict(name="", context_length=4096, n_mtp=0, n_head_kv=1, rms_eps=1e-6, mla=True,
               rope_base=10000.0, rope_scaling="yarn", rope_factor=40.0, rope_orig_ctx=4096,
               rope_attn_factor=1.0, expert_weights_norm=False, n_group=0, n_group_used=0)

PRESETS: dict[str, ModelConfig] = {
    # V2-Lite style: no q_lora, softmax gating, one dense leading layer. Rows are multiples of 256 where
    # the real model's are, so K-quants apply to the same tensors.
    "tiny-v2": ModelConfig(**_COMMON | dict(
        name="tiny-v2", hidden=256, n_layer=4, n_head=4, vocab_size=1024, q_lora_rank=0, kv_lora_rank=256,
        qk_nope_dim=32, qk_rope_dim=32, v_head_dim=64, n_dense_lead=1, dense_ffn=512, n_expert=8,
        n_expert_used=2, n_expert_shared=2, expert_ffn=256, expert_weights_scale=1.0, gating=GATING_SOFTMAX,
        mscale_all_dim=0.707)),
    # V3 style: q_lora, sigmoid gating with selection bias, group-limited top-k, normalized weights.
    "tiny-v3": ModelConfig(**_COMMON | dict(
        name="tiny-v3", hidden=256, n_layer=5, n_head=4, vocab_size=1024, q_lora_rank=256,
        kv_lora_rank=256, qk_nope_dim=32, qk_rope_dim=32, v_head_dim=64, n_dense_lead=2, dense_ffn=512,
        n_expert=16, n_expert_used=4, n_expert_shared=1, expert_ffn=256, n_group=4, n_group_used=2,
        expert_weights_scale=2.5, expert_weights_norm=True, gating=GATING_SIGMOID, mscale_all_dim=1.0)),
    # Real DeepSeek-V2-Lite shapes (15.7B parameters).
    "v2-lite": ModelConfig(**_COMMON | dict(
        name="DeepSeek-V2-Lite-shaped", context_length=163840, hidden=2048, n_layer=27, n_head=16,
        vocab_size=102400, q_lora_rank=0, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64,
        v_head_dim=128, n_dense_lead=1, dense_ffn=10944, n_expert=64, n_expert_used=6, n_expert_shared=2,
        expert_ffn=1408, expert_weights_scale=1.0, gating=GATING_SOFTMAX, mscale_all_dim=0.707)),
    # Real DeepSeek-V3 layer shapes; --layers/--dense choose how many (default: 1 dense + 3 MoE).
    "v3": ModelConfig(**_COMMON | dict(
        name="DeepSeek-V3-shaped", context_length=163840, hidden=7168, n_layer=4, n_head=128,
        vocab_size=129280, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64,
        v_head_dim=128, n_dense_lead=1, dense_ffn=18432, n_expert=256, n_expert_used=8, n_expert_shared=1,
        expert_ffn=2048, n_group=8, n_group_used=4, expert_weights_scale=2.5, expert_weights_norm=True,
        gating=GATING_SIGMOID, mscale_all_dim=1.0)),
}

# llama-quantize falls back to these when a row is not a multiple of 256 (llama-quant.cpp)
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0}


def _use_more_bits(i: int, n: int) -> bool:
    # llama-quant.cpp: the first and last eighth of the layers and every third one between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def choose_type(name: str, shape: tuple[int, ...], ftype: str, n_layer: int) -> GGMLType:
    """The GGML type of one tensor for a file type: a plain type name, or "q4_k_m" / "q2_k"-style mixes."""
    if len(shape) == 1 or name.endswith("_norm.weight") or "ffn_gate_inp" in name or "exp_probs_b" in name:
        return T.F32   # llama-quantize keeps 1-D tensors and routers at full precision
    if ftype == "q4_k_m":
        t = T.Q4_K
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if name == "output.weight":
            t = T.Q6_K
        elif ("ffn_down" in name or "attn_kv_b" in name) and _use_more_bits(layer, n_layer):
            t = T.Q6_K
    else:
        t = parse_type(ftype)
    row = shape[-1]
    if row % TYPE_INFO[t].block_size:
        t = _FALLBACK.get(t, t)
        if row % TYPE_INFO[t].block_size:
            t = T.F16
    return t


def _init_std(name: str, shape: tuple[int, ...], n_layer: int) -> float:
    """Weight spread as a trained model starts: 1/sqrt(fan-in), and the projections that write into the
    residual stream scaled by 1/sqrt(2 n_layer) (GPT-2's scheme), so a random model is not chaotic."""
    if name == "token_embd.weight":
        return 1.0
    std = 1.0 / math.sqrt(shape[-1])
    if "attn_output" in name or "ffn_down" in name:
        std /= math.sqrt(2 * n_layer)
    return std


# Byte offsets of the fp16 scale d, then of dmin / m where the type has one (ggml-common.h block structs)
_SCALE_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
                 T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


class _BlockPool:
    """Random valid blocks of one type whose dequantized values have mean ~0 and std 1, drawn once."""

    POOL_BYTES = 16 << 20

    def __init__(self, ggml_type: GGMLType, rng: np.random.Generator):
        info = TYPE_INFO[ggml_type]
        n_blocks = self.POOL_BYTES // info.type_size
        blocks = np.frombuffer(rng.bytes(n_blocks * info.type_size), np.uint8).reshape(n_blocks, -1).copy()
        self.type, self.info, self._rng = ggml_type, info, rng
        self.blocks = self._patch_scales(blocks)

    def _patch_scales(self, blocks: np.ndarray) -> np.ndarray:
        d_at, min_at = _SCALE_FIELDS[self.type][0], _SCALE_FIELDS[self.type][1:]
        sample = blocks[:4096]   # a view: patches below reach it

        def put(at, value):
            blocks[:, at:at + 2] = np.full(len(blocks), value, np.float16).view(np.uint8).reshape(-1, 2)

        put(d_at, 1.0)
        dmin = 0.0
        if min_at:
            # Q4_1/Q5_1 add m, K-quants subtract dmin * min_j: measure both terms, then cancel the mean
            put(min_at[0], 0.0)
            mean_scale = float(dequantize(sample, self.type).mean())
            put(d_at, 0.0)
            put(min_at[0], 1.0)
            mean_min = float(dequantize(sample, self.type).mean())
            dmin = -mean_scale / mean_min
            put(d_at, 1.0)
            put(min_at[0], dmin)
        std = float(dequantize(sample, self.type).std())
        put(d_at, 1.0 / std)
        if min_at:
            put(min_at[0], dmin / std)
        else:
            # symmetric types have a small offset (Q4_0: q - 8 averages -0.5): a random sign per block cancels it
            sign = np.where(self._rng.random(len(blocks)) < 0.5, 0x80, 0).astype(np.uint8)
            blocks[:, d_at + 1] |= sign
        return blocks

    def chunks(self, n_blocks: int, std: float, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """n_blocks blocks whose values have the given std (scales multiplied in fp16)."""
        pool = self.blocks
        if std != 1.0:
            pool = _scaled(pool, self.type, std)
        left = n_blocks
        while left:
            n = min(left, len(pool))
            start = int(rng.integers(0, len(pool) - n + 1))
            yield pool[start:start + n]
            left -= n


def _scaled(blocks: np.ndarray, ggml_type: GGMLType, factor: float) -> np.ndarray:
    """A copy of the blocks with their fp16 scale fields multiplied by factor."""
    out = blocks.copy()
    for at in _SCALE_FIELDS[ggml_type]:
        f16 = out[:, at:at + 2].copy().view(np.float16)
        out[:, at:at + 2] = (f16.astype(np.float32) * factor).astype(np.float16).view(np.uint8)
    return out


def _gaussian_chunks(shape: tuple[int, ...], std: float, rng: np.random.Generator,
                     chunk_values: int = 1 << 22) -> Iterator[np.ndarray]:
    """float32 N(0, std^2) values of a tensor, as whole rows, at most ~chunk_values at a time."""
    n_rows, row = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
    step = max(1, chunk_values // row)
    for r in range(0, n_rows, step):
        yield rng.standard_normal((min(step, n_rows - r), row), dtype=np.float32) * np.float32(std)


@dataclasses.dataclass(frozen=True)
class HotExperts:
    """Which experts the router prefers: per MoE layer, the ids given a logit boost."""
    fraction: float = 0.0   # share of experts per layer that are hot (0: a uniform router)
    boost: float = 3.0      # added router logit for a hot expert (on a hidden state along the hot direction)


def _tensor_chunks(name: str, shape: tuple[int, ...], ggml_type: GGMLType, method: str, hot: HotExperts,
                   u: np.ndarray, pools: dict, rng: np.random.Generator, n_layer: int):
    """A function yielding the raw bytes of one tensor (see the module docstring for the methods)."""
    std = _init_std(name, shape, n_layer)

    def values():
        if name.endswith("norm.weight"):
            yield (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).reshape(-1, shape[-1])
        elif name.endswith("exp_probs_b.bias"):
            yield 0.01 * rng.standard_normal((1, shape[-1]), dtype=np.float32)
        elif name.endswith("ffn_gate_inp.weight"):
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
            n_hot = int(round(hot.fraction * shape[0]))
            if n_hot:
                ids = rng.choice(shape[0], n_hot, replace=False)
                w[ids] += np.float32(hot.boost / math.sqrt(shape[1])) * u
            yield w
        elif name == "token_embd.weight":
            # embeddings share the hot direction u, so routers can prefer experts along it
            n_rows = shape[0] if method == "quantize" else min(shape[0], 4096)
            rows = rng.standard_normal((n_rows, shape[1]), dtype=np.float32)
            if hot.fraction:
                rows += np.float32(math.sqrt(shape[1])) * u
            for r in range(0, shape[0], n_rows):
                yield rows[:min(n_rows, shape[0] - r)]
        else:
            yield from _gaussian_chunks(shape, std, rng)

    def chunks():
        pool_ok = method == "blocks" and ggml_type in _SCALE_FIELDS and name != "token_embd.weight"
        if not pool_ok:
            for v in values():
                yield quantize(v, ggml_type)
            return
        if ggml_type not in pools:
            pools[ggml_type] = _BlockPool(ggml_type, rng)
        n_blocks = int(np.prod(shape, dtype=np.int64)) // TYPE_INFO[ggml_type].block_size
        yield from pools[ggml_type].chunks(n_blocks, std, rng)

    if name == "token_embd.weight" and method == "blocks":
        rows = list(values())          # the pool of distinct rows, quantized once, tiled over the vocab
        q = quantize(rows[0], ggml_type)
        return lambda: (q[:len(r)] for r in rows)
    return chunks


def build(path: str, cfg: ModelConfig, ftype: str = "q8_0", method: str = "auto",
          hot: HotExperts = HotExperts(), seed: int = 0) -> None:
    """Write a random-weight deepseek2 GGUF of config cfg with weights of file type ftype."""
    if method == "auto":
        n_values = sum(int(np.prod(s.shape, dtype=np.int64)) for s in tensor_specs(cfg))
        method = "quantize" if n_values < 50_000_000 else "blocks"
    if method not in ("quantize", "blocks"):
        raise ValueError(f"method must be 'auto', 'quantize' or 'blocks', not {method!r}")
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(cfg.hidden).astype(np.float32)
    u /= np.linalg.norm(u)
    specs = [s for s in tensor_specs(cfg)
             if s.required or s.name == "output.weight"
             or (s.name.endswith("exp_probs_b.bias") and cfg.gating == GATING_SIGMOID)]
    pools: dict = {}
    tensors = []
    for s in specs:
        t = choose_type(s.name, s.shape, ftype, cfg.n_layer)
        tensors.append(TensorData(s.name, s.shape, t,
                                  _tensor_chunks(s.name, s.shape, t, method, hot, u, pools, rng, cfg.n_layer)))
    v3_style = cfg.gating == GATING_SIGMOID
    vocab = synthetic_vocab(cfg.vocab_size, "deepseek-v3" if v3_style else "deepseek-llm",
                            V3_CHAT_TEMPLATE if v3_style else V2_CHAT_TEMPLATE)
    write_gguf(path, config_metadata(cfg) + vocab, tensors)


def preset(name: str, n_layer: int | None = None, n_dense: int | None = None) -> ModelConfig:
    """A preset config, optionally with another number of layers / leading dense layers."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    changes = {}
    if n_layer is not None:
        changes["n_layer"] = n_layer
    if n_dense is not None:
        changes["n_dense_lead"] = n_dense
    cfg = dataclasses.replace(cfg, **changes)
    if not 0 <= cfg.n_dense_lead <= cfg.n_layer:
        raise ValueError(f"--dense {cfg.n_dense_lead} must be between 0 and --layers {cfg.n_layer}")
    return cfg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the GGUF file to write")
    p.add_argument("--preset", default="tiny-v2", choices=list(PRESETS), help="model shape (default tiny-v2)")
    p.add_argument("--type", default="q8_0",
                   help="weight type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k, "
                        "or the mix q4_k_m (default q8_0)")
    p.add_argument("--layers", type=int, help="number of layers (default: the preset's)")
    p.add_argument("--dense", type=int, help="number of leading dense layers (default: the preset's)")
    p.add_argument("--method", default="auto", choices=["auto", "quantize", "blocks"],
                   help="quantize Gaussian weights (exact, slow) or write random blocks (fast); "
                        "auto picks by size")
    p.add_argument("--hot-experts", type=float, default=0.0, metavar="FRACTION",
                   help="share of experts per layer that the router prefers, as in real models (default 0)")
    p.add_argument("--hot-boost", type=float, default=3.0, help="router logit boost of hot experts")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    cfg = preset(args.preset, args.layers, args.dense)
    if args.type != "q4_k_m":
        parse_type(args.type)  # a clear error for a misspelt type before anything is written
    build(args.output, cfg, args.type, args.method, HotExperts(args.hot_experts, args.hot_boost), args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dslocal.quant.synthetic",
                                description="Write a random-weight deepseek2 GGUF file.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
