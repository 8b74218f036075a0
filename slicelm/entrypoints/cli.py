"""The ``slicelm`` console script: ``slicelm serve MODEL [flags]`` and ``slicelm generate MODEL --prompt …``."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import importlib.util
import logging
import signal
import sys

from slicelm.entrypoints.cli_args import normalize_argv

# Subcommand packages that must not import torch: each has COMMANDS, add_subcommands(sub), run(args) -> int.
LIGHT_CLIS = tuple(m for m in ("slicelm.stack.cli", "slicelm.router.cli", "slicelm.router.dashboard.cli",
                                "slicelm.entrypoints.download")
                   if importlib.util.find_spec(m.rsplit(".", 1)[0]))


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="HF model directory, .gguf file, bundled short name (smollm2-135m-instruct) or Hub id "
                             "(org/name, org/name:QUANT for a GGUF repo)")
    parser.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)


def make_parser() -> argparse.ArgumentParser:
    from slicelm.config import EngineArgs
    from slicelm.entrypoints.server.app import add_server_args

    parser = argparse.ArgumentParser(prog="slicelm", description="slicelm: LLM inference engine and server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_arg(serve)
    add_server_args(serve)
    EngineArgs.add_cli_args(serve)

    gen = sub.add_parser("generate", help="generate once, offline, and print the text")
    _add_model_arg(gen)
    gen.add_argument("--prompt", required=True, help="the prompt (or the user message with --chat)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--stop", action="append", default=None)
    EngineArgs.add_cli_args(gen)
    for name in LIGHT_CLIS:
        importlib.import_module(name).add_subcommands(sub)
    return parser


def _light_main(argv: list[str]) -> int | None:
    for name in LIGHT_CLIS:
        module = importlib.import_module(name)
        if argv and argv[0] in module.COMMANDS:
            parser = argparse.ArgumentParser(prog="slicelm")
            module.add_subcommands(parser.add_subparsers(dest="command", required=True))
            return module.run(parser.parse_args(argv))
    return None


def _resolve_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from slicelm.config import EngineArgs

    model = args.model or args.model_flag or EngineArgs.model
    if args.model and args.model_flag and args.model != args.model_flag:
        parser.error("give the model once (positional or --model)")
    args.model = model
    del args.model_flag


def _generate(args: argparse.Namespace) -> int:
    from slicelm.config import EngineArgs
    from slicelm.entrypoints.llm import LLM
    from slicelm.sampling_params import SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    kwargs = {k: v for k, v in vars(engine_args).items() if k != "model"}
    llm = LLM(engine_args.model, **kwargs)
    params = SamplingParams.from_optional(max_tokens=args.max_tokens, temperature=args.temperature,
                                          top_p=args.top_p, top_k=args.top_k, n=args.n, stop=args.stop)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for o in outputs[0].outputs:
        print(o.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    with contextlib.suppress(OSError, ValueError):  # a stderr without a file descriptor (embedded): no dumps
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: every thread's stack to stderr
    argv = normalize_argv(sys.argv[1:] if argv is None else list(argv))
    light = _light_main(argv)
    if light is not None:
        return light
    parser = make_parser()
    args = parser.parse_args(argv)
    _resolve_model(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    try:
        if args.command == "serve":
            from slicelm.entrypoints.server.api_servers import serve

            return serve(args)
        return _generate(args)
    except ValueError as e:  # bad flags or an unknown model: one clear line, no traceback
        print(f"slicelm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
