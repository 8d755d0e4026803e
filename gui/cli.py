"""The `dslocal` command: one sub-command per verb; a user's mistake is one line on stderr and exit code 2.

Only the chosen verb's module is imported, so `dslocal info` does not pay for importing torch.
"""
from __future__ import annotations

import argparse
import sys

from dslocal.quant.gguf_file import GGUFError

EXIT_USAGE = 2


def _run_verb():
    from dslocal.gui import repl
    return repl


def _info_verb():
    from dslocal.gui import info
    return info


def _synth_verb():
    from dslocal.quant import synthetic
    return synthetic


def _bench_verb():
    from dslocal.bench import command
    return command


def _chat_verb():
    from dslocal.gui import chat_app
    return chat_app


def _serve_verb():
    from dslocal.gui import server
    return server


def _train_verb():
    from dslocal.runtime import train
    return train


def _export_verb():
    from dslocal.runtime import export
    return export


def _quantize_verb():
    from dslocal.quant import requantize
    return requantize


VERBS = {
    "run": (_run_verb, "chat with a model in the terminal, or complete one --prompt"),
    "chat": (_chat_verb, "chat with a model in a local window (a web page on 127.0.0.1)"),
    "serve": (_serve_verb, "serve an OpenAI-compatible HTTP API on 127.0.0.1"),
    "bench": (_bench_verb, "tokens per second of a model, or --moe-only of the CPU expert kernels"),
    "train": (_train_verb, "train a small DeepSeek-architecture model"),
    "export": (_export_verb, "export a training checkpoint to a deepseek2 GGUF"),
    "quantize": (_quantize_verb, "re-quantize a deepseek2 GGUF to another weight type"),
    "info": (_info_verb, "show what a deepseek2 GGUF file holds and what a token costs to read"),
    "synth": (_synth_verb, "write a random-weight deepseek2 GGUF (tiny test models, real-sized bench files)"),
}


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dslocal",
                                description="Run DeepSeek mixture-of-experts GGUF models on one machine.")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, text) in VERBS.items():
        sp = sub.add_parser(name, help=text, description=text)
        if name == chosen:
            verb = module()
            verb.add_arguments(sp)
            sp.set_defaults(run=verb.run)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.run(args)
    except GGUFError as e:
        print(f"dslocal: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"dslocal {args.verb}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dslocal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
