"""``slicelm plan | up | ps | down``: registered by ``slicelm/entrypoints/cli.py``; none of them imports torch."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from rich.console import Console

from slicelm.loader.errors import HubError
from slicelm.stack.spec import StackSpec, StackSpecError, load_stack
from slicelm.stack.state import resolve_run_dir

COMMANDS = ("plan", "up", "ps", "down")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="place a stack file's replicas on this machine's GPUs (HAMi's policies)")
    plan.add_argument("stack_file", help="stack YAML (production-stack Helm values + a slicelm: section)")
    plan.add_argument("--inventory", default=None, help="GPU inventory JSON (HAMi node-register format) "
                      "instead of this machine's GPUs")
    plan.add_argument("--format", choices=["table", "json"], default="table")

    up = sub.add_parser("up", help="start every replica of a stack file (and the router), supervise them")
    up.add_argument("stack_file")
    up.add_argument("--run-dir", default=None, help="state.json and logs (default: slicelm.runDir, else "
                    "$XDG_STATE_HOME/slicelm/stack)")
    up.add_argument("--inventory", default=None, help=argparse.SUPPRESS)
    up.add_argument("--dry-run", action="store_true", help="print the commands and env, start nothing")
    up.add_argument("--detach", action="store_true", help="return once the stack is ready; it keeps running "
                    "(stop it with slicelm down)")
    up.add_argument("--supervisor", action="store_true", help=argparse.SUPPRESS)  # the detached copy

    for name, text in (("ps", "show a running stack's replicas"), ("down", "stop a running stack")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--run-dir", default=None)
        if name == "ps":
            p.add_argument("--format", choices=["table", "json"], default="table")


def _load(path: str, console: Console) -> StackSpec:
    spec = load_stack(path)
    for w in spec.warnings:
        console.print(f"[dim]note: {w}[/]", highlight=False)
    return spec


def _inventory(path: str | None):
    from slicelm.slicing.inventory import Inventory

    return Inventory.from_file(path) if path else Inventory.detect()


def _plan(args: argparse.Namespace, out: Console, err: Console) -> int:
    spec = _load(args.stack_file, err)
    from slicelm.stack.plan_view import plan_table
    from slicelm.stack.planning import make_plan

    plan = make_plan(spec, _inventory(args.inventory))
    for note in plan.notes:
        err.print(f"note: {note}", highlight=False)
    if args.format == "json":
        print(json.dumps(plan.to_json(), indent=2))
    else:
        out.print(plan_table(plan))
    for u in plan.unplaced:
        err.print(f"[red]cannot place {u['model']}/{u['replica']}: {'; '.join(u['reasons'])}[/]", highlight=False)
    return 0 if plan.feasible else 2


def _up(args: argparse.Namespace, out: Console, err: Console) -> int:
    spec = _load(args.stack_file, err)  # a bad file fails before anything else is imported or started
    from slicelm.stack import up
    from slicelm.stack.planning import make_plan

    run_dir = resolve_run_dir(args.run_dir, spec.slicelm.runDir)
    plan = make_plan(spec, _inventory(args.inventory))
    for note in plan.notes:
        err.print(f"note: {note}", highlight=False)
    if not plan.feasible:
        for u in plan.unplaced:
            err.print(f"[red]cannot place {u['model']}/{u['replica']}: {'; '.join(u['reasons'])}[/]",
                      highlight=False)
        return 2
    up.preflight(spec, plan, run_dir)
    if args.dry_run:
        _, mps_env = up.start_mps(spec, plan, run_dir, dry_run=True)
        launches = up.replica_launches(spec, plan, run_dir, mps_env)
        router = up.router_launch(spec, run_dir)
        up.print_dry_run([*launches, *([router] if router else [])], out)
        return 0
    if args.detach and not args.supervisor:
        from slicelm.stack.prefetch import prefetch

        prefetch(spec)  # here, in the foreground: one progress display, and Hub errors before anything starts
        return up.detach(args, run_dir, err)
    run_dir.mkdir(parents=True, exist_ok=True)
    return up.supervise(spec, plan, run_dir, err, quiet=args.supervisor)


def _ps(args: argparse.Namespace, out: Console) -> int:
    from slicelm.stack.status import status, table

    run_dir = resolve_run_dir(args.run_dir)
    st = status(run_dir)
    if args.format == "json":
        print(json.dumps(st or {"router": None, "replicas": []}, indent=2))
        return 0
    if st is None:
        out.print(f"no stack in {run_dir}", highlight=False)
        return 0
    out.print(table(st, title=f"slicelm stack ({st['phase']}, {run_dir})"))
    if st["router"]:
        out.print(f"router: {st['router']['url']}", highlight=False)
    elif st.get("router_state"):
        out.print(f"router: {st['router_state']} (its URL is shown once it accepts connections)", highlight=False)
    return 0


def _down(args: argparse.Namespace, out: Console) -> int:
    from slicelm.stack.status import down

    for line in down(resolve_run_dir(args.run_dir)):
        out.print(line, highlight=False)
    return 0


def run(args: argparse.Namespace) -> int:
    out, err = Console(), Console(stderr=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    try:
        if args.command == "plan":
            return _plan(args, out, err)
        if args.command == "up":
            return _up(args, out, err)
        if args.command == "ps":
            return _ps(args, out)
        return _down(args, out)
    except StackSpecError as e:
        for line in e.problems:
            print(f"slicelm {args.command}: error: {line}", file=sys.stderr)
        return 2
    except HubError as e:  # a model named by Hub id cannot be had: nothing was started
        print(f"slicelm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, OSError) as e:
        print(f"slicelm {args.command}: error: {e}", file=sys.stderr)
        return 2 if args.command == "plan" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slicelm")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

