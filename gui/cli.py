"""The `dslocal` command: one sub-command per verb; a user's mistake is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys

from dslocal.quant.gguf_file import GGUFError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    # Verb modules are imported here, when parsing, not at import time of this module.
    from dslocal.gui import info
    from dslocal.quant import synthetic

    p = argparse.ArgumentParser(prog="dslocal",
                                description="Run DeepSeek mixture-of-experts GGUF models on one machine.")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    verbs = {
        "info": (info, "show what a deepseek2 GGUF file holds and what a token costs to read"),
        "synth": (synthetic, "write a random-weight deepseek2 GGUF (tiny test models, real-sized bench files)"),
    }
    for name, (module, text) in verbs.items():
        sp = sub.add_parser(name, help=text, description=text)
        module.add_arguments(sp)
        sp.set_defaults(run=module.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
