"""The ``gradguard`` command: ``gradguard demo``, ``gradguard report`` and ``gradguard drill``.

Lightning, torch and TensorBoard are imported only by the subcommand that needs them, so ``gradguard --version``
and ``gradguard --help`` return at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_gradguard.__about__ import __version__

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Gradient health for PyTorch Lightning: run the demo, or summarise the gradguard data of a run.",
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,report,drill}")

    demo = sub.add_parser(
        "demo",
        help="train an example that blows up without gradguard, with the gradguard callbacks",
        description="Train an example with a fault that ruins it (lstm: a learning rate 1000x too high; cnn: one "
        "training batch whose images arrive x1000), with GradientNormMonitor, AdaptiveGradientClipping and NaNGuard "
        "(or without them: --unguarded), and print what happened and the verdict.",
    )
    demo.add_argument("example", nargs="?", default="lstm", choices=["lstm", "cnn"], help="which example (lstm)")
    demo.add_argument("--quick", action="store_true", help="fewer steps (about a quarter of the time)")
    demo.add_argument("--unguarded", action="store_true", help="train without the gradguard callbacks")
    demo.add_argument("--both", action="store_true", help="run unguarded first, then guarded, and compare")
    demo.add_argument("--logdir", default="gradguard_logs", help="TensorBoard log directory (gradguard_logs)")
    demo.add_argument("--seed", type=int, default=0, help="seed of weights, data and shuffling (0)")
    demo.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    demo.add_argument(
        "--no-progress-bar",
        action="store_true",
        help="hide Lightning's progress bar (it is off anyway when stdout is not a terminal: CI logs, | tee)",
    )
    demo.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")

    report = sub.add_parser(
        "report",
        help="summarise the gradient health of the runs in a TensorBoard log directory",
        description="Read the gradguard tags of every run under LOGDIR and print gradient-norm percentiles, the "
        "clip rate, vanishing/exploding layers and NaNGuard events; write a PNG with each run's overview figure (the "
        "one NaNGuard writes to TensorBoard's Images tab as gradguard/overview): gradient norm and its interval "
        "maximum against the clip threshold, the loss with its interval maxima, the learning rate, the clipped share "
        "and every guard event.",
    )
    report.add_argument("logdir", help="TensorBoard log directory (a run or a parent of runs)")
    report.add_argument(
        "--png", default=None, help="where to write the overview figures (default: LOGDIR/gradguard_report.png)"
    )
    report.add_argument("--no-png", action="store_true", help="print the summary only")

    drill = sub.add_parser(
        "drill",
        help="inject faults into an example at healthy settings and check that the gradguard callbacks handle each",
        description="Train an example at healthy settings (lstm: Adam lr 0.01; cnn: without the demo's x1000 batch) "
        "with default_callbacks() and a FaultDrill that injects a NaN batch, an inf loss, a x1e4 loss spike, a "
        "transient NaN in one forward, three NaN batches in a row and a NaN weight, one every 70 steps (40 with "
        "--quick); print what the guard did with each and whether the loss was back to its pre-fault level 50 steps "
        "later (25 with --quick). Exits 1 if a fault was not handled.",
    )
    drill.add_argument("example", nargs="?", default="lstm", choices=["lstm", "cnn"], help="which example (lstm)")
    drill.add_argument("--quick", action="store_true", help="faults 40 steps apart, recovery judged 25 steps on")
    drill.add_argument("--seed", type=int, default=0, help="seed of weights, data and shuffling (0)")
    drill.add_argument("--logdir", default="gradguard_logs", help="TensorBoard log directory (gradguard_logs)")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from lightning_gradguard.demo import run_demo, stdout_is_terminal, tensorboard_guide

    if args.steps is not None and args.steps < 1:
        print("gradguard demo: --steps must be >= 1", file=sys.stderr)
        return 2
    modes = [False, True] if args.both else [not args.unguarded]
    progress_bar = not args.no_progress_bar and stdout_is_terminal()
    quiet = "" if progress_bar or args.no_progress_bar else " (no progress bar: stdout is not a terminal)"
    results = []
    for guarded in modes:
        with_ = "with" if guarded else "without"
        print(f"gradguard demo: training the {args.example} example {with_} gradguard{quiet} ...", flush=True)
        result = run_demo(
            args.example,
            quick=args.quick,
            guarded=guarded,
            logdir=args.logdir,
            seed=args.seed,
            max_steps=args.steps,
            progress_bar=progress_bar,
        )
        results.append(result)
        print()
        print("\n".join(result.summary_lines()))
        print()
    if args.json:
        import json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
        print(f"Results as JSON: {args.json}")
    print("\n".join(tensorboard_guide(args.logdir, guarded=any(r.guarded for r in results))))
    print(f"Summarise them: gradguard report {args.logdir}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lightning_gradguard.report import format_summary, plot_report, summarize

    try:
        summary = summarize(args.logdir)
    except (FileNotFoundError, ValueError) as e:
        print(f"gradguard report: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if not args.no_png:
        png = Path(args.png) if args.png else Path(args.logdir) / "gradguard_report.png"
        try:
            written = plot_report(summary, png)
        except ImportError as e:
            print(f"gradguard report: {e}", file=sys.stderr)
            return 2
        print(f"\nplot: {written}")
    return 0


def _drill(args: argparse.Namespace) -> int:
    from lightning_gradguard._drill_run import run_drill

    print(f"gradguard drill: training the {args.example} example with injected faults ...", flush=True)
    result = run_drill(args.example, quick=args.quick, seed=args.seed, logdir=args.logdir)
    print()
    print(result.report)
    print(f"\n{result.example}: {result.steps} steps in {result.wall_s:.1f} s")
    if result.error:
        print(f"gradguard drill: the fit stopped early: {result.error}", file=sys.stderr)
    if not result.ok:
        bad = [r["fault"] for r in result.rows if r["injected"] and not r["handled"]]
        print(f"gradguard drill: not handled: {', '.join(bad) or 'nothing was injected'}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradguard`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "report":
        return _report(args)
    if args.command == "drill":
        return _drill(args)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
