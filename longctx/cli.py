"""`longctx <command>`: parse, then call one function per command.

Each command lives beside the code it drives, in a module with two functions:
    configure(parser: argparse.ArgumentParser) -> None   # declare options
    run(args: argparse.Namespace) -> int | None          # do the work (typed functions underneath)
Modules are imported only when their command runs, so `longctx --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from longctx.errors import LongctxError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("longctx.demo", "the whole story on the embedded corpus: train, extend, evaluate, report"),
    "train": ("longctx.train.command", "train a model (context-length curriculum, resumable checkpoints)"),
    "extend": ("longctx.extend.command", "extend a checkpoint's context window (PI, NTK, YaRN, ...)"),
    "eval": ("longctx.eval.command", "measure long-context ability: ppl, passkey, niah, ruler, gen"),
    "report": ("longctx.eval.report", "gather results of several runs into one Markdown/HTML page"),
    "generate": ("longctx.infer.command", "generate text from a checkpoint"),
    "serve": ("longctx.serve.command", "serve a checkpoint behind an OpenAI-compatible HTTP API"),
    "convert": (
        "longctx.interop.command",
        "convert between longctx, Hugging Face directories and GGUF files",
    ),
    "pull": ("longctx.pull", "fetch a real pretrained model once (offline after), usable by name everywhere"),
    "finetune": ("longctx.tasks.command", "fine-tune for classification or generation (LoRA, adapters)"),
    "plan": ("longctx.train.planner", "predict training memory, or the longest context that fits"),
    "info": ("longctx.cli", "describe a checkpoint"),
}


def configure(p: argparse.ArgumentParser) -> None:  # `longctx info`
    p.add_argument(
        "ckpt", help="checkpoint: a longctx or Hugging Face directory, a .gguf file, a pulled name"
    )


def run(args: argparse.Namespace) -> int:  # `longctx info`
    from longctx.checkpoint import describe

    print(json.dumps(describe(args.ckpt), indent=2), flush=True)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the problem and where the options are, not the whole usage block
    (20 lines for `generate`) above it. Subcommands' parsers are of this class too (argparse's default)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv` (default sys.argv[1:]): only the command it names configures its options."""
    parser = _Parser(
        prog="longctx",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv else None
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == wanted:  # import only the module of the command being run
            importlib.import_module(module).configure(p)
    return parser


def _version() -> str:
    from longctx import __version__

    return __version__


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush cannot fail too."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        module = importlib.import_module(COMMANDS[args.command][0])
        code = module.run(args)
        return int(code or 0)
    except LongctxError as e:
        print(f"longctx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `longctx info ck | head`: the reader left; nothing more to say
        _silence_stdout()
        return 0
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"longctx {args.command}: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longctx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line by default, the traceback on request
        if os.environ.get("LONGCTX_DEBUG"):
            raise
        print(
            f"longctx {args.command}: internal error: {type(e).__name__}: {e} "
            "(rerun with LONGCTX_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
