"""`featurize run | train | apply | eval | submit | status | inspect | models | layers | demo | report`.

Exit codes: 0 when the job completed (some samples may be error rows), 2 when it could not run
(bad job file, unreachable source, unknown model, output holding another job's), 1 when it failed
midway (run the same command again to resume), 130 when interrupted (the same).
`featurize submit --wait` exits with the job's own code; without --wait, 0 once the cluster took it.
`featurize status` exits 0 when the output is complete, 1 when it is not, 2 when there is none.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import List, Optional

from .cli_args import add_storage_options
from .config import load_job, parse_job, read_job_file
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, ConfigError, Refused
from .interrupt import sigterm_as_interrupt
from .redact import redact_text


def main(argv: Optional[List[str]] = None) -> int:
    """Every command's refusal is caught here, once: one line on stderr, exit 2."""
    from .console import NativeStderr

    try:
        args = _parser().parse_args(argv)  # a bad --storage-options is a refusal too (cli_args)
        sigterm_as_interrupt()  # SIGTERM (schedulers, kubectl) stops a command as Ctrl-C does
        with contextlib.nullcontext() if getattr(args, "verbose", False) else NativeStderr():
            return args.func(args)
    except Refused as e:
        _say(f"featurize: {e}")
        return EXIT_REFUSED
    except KeyboardInterrupt:
        _say("featurize: interrupted; run the same command again to resume")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `featurize models | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise
        return EXIT_OK


def _say(line: str) -> None:
    """A message for the user on stderr, credentials masked (exceptions often quote a URL)."""
    print(redact_text(line), file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="featurize", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"featurize {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a job file")
    _job_arguments(run)
    run.add_argument("--address", default=None, help="Ray address (auto, ray://HOST:10001); default: local Ray")
    _console_arguments(run)
    run.add_argument("--overwrite", action="store_true",
                     help="replace another job's output in output.uri, once the new one is complete")
    run.add_argument("--retry-failed", action="store_true",
                     help="process again the samples in the errors table (after a fix or an outage)")
    run.add_argument("--incremental", action="store_true",
                     help="list the source again and process only the samples added since it was planned")
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train a head (lstm, attention, linear, mlp, autoencoder) on a features table")
    train.add_argument("job", help="training file (YAML)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key, e.g. --set train.epochs=5 (repeatable)")
    train.add_argument("--address", default=None, help="Ray address (auto, ray://HOST:10001); default: local Ray")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the earlier training in output.uri (epoch states, checkpoint); train anew")
    train.add_argument("--sweep", action="append", nargs="?", const="", default=None, metavar="KEY=V1,V2",
                       help="try a grid through Ray Tune and keep the best on the validation rows: bare, weight_decay "
                            "0,1e-4,1e-3,1e-2,1e-1 (train.optimizer lbfgs: 1/(C n_train), C 0.001..100); or "
                            "weight_decay=..., lr=..., max_concurrent_trials=N (repeatable)")
    _console_arguments(train, "a line per epoch")
    train.set_defaults(func=cmd_train)

    apply = sub.add_parser("apply", help="apply a trained head to a features table, writing a new one")
    apply.add_argument("checkpoint", help="the head's checkpoint directory (featurize train's output.uri)")
    apply.add_argument("--input", required=True, help="a featurize output root with the head's input column")
    apply.add_argument("--output", required=True, help="the new output root")
    apply.add_argument("--name", default=None, help="lstm/attention: the column is clip_<name> (default: the kind)")
    add_storage_options(apply, "fsspec options for the input and checkpoint")
    add_storage_options(apply, "fsspec options for the output (default: --storage-options when on the same store)",
                        flag="--output-storage-options", default=False)
    apply.add_argument("--address", default=None, help="Ray address; default: local Ray")
    apply.add_argument("--overwrite", action="store_true", help="replace another table in --output, once complete")
    apply.add_argument("--allow-other-source", action="store_true",
                       help="apply a head to features of another model, weights or layer than it was trained on")
    _console_arguments(apply)
    apply.set_defaults(func=cmd_apply)

    submit = sub.add_parser("submit", help="submit a job or training file to a Ray cluster through its Jobs API")
    _job_arguments(submit)
    submit.add_argument("--address", default=None,
                        help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS)")
    submit.add_argument("--overwrite", action="store_true",
                        help="the job or training runs with --overwrite: it replaces the output it finds")
    submit.add_argument("--wait", action="store_true",
                        help="stream the job's logs and exit with its outcome")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="planned, committed, errored and remaining counts of an output root")
    status.add_argument("out", help="output root (local path or URI)")
    add_storage_options(status, "fsspec options for the output's store")
    status.set_defaults(func=cmd_status)

    inspect = sub.add_parser("inspect", help="describe an output root")
    inspect.add_argument("out", help="output root (local path or URI)")
    add_storage_options(inspect, 'fsspec options for the output\'s store, e.g. \'{"anon": true}\'')
    inspect.set_defaults(func=cmd_inspect)

    from .config import DEFAULT_CROP

    models = sub.add_parser("models", help="the model names each family offers (model.arch, temporal[].kind)")
    models.add_argument("--family", default=None, help="only this family (torchvision, timm, open_clip, temporal)")
    models.set_defaults(func=cmd_models)
    layers = sub.add_parser("layers", help="a model's layers (model.layer) with their output shapes at a crop")
    layers.add_argument("arch", help="a model name, as `featurize models` lists them")
    layers.add_argument("--family", default="torchvision", help="as model.family (default: torchvision)")
    layers.add_argument("--crop", type=int, default=DEFAULT_CROP,
                        help=f"the input's side in pixels, as preprocess.crop (default: {DEFAULT_CROP})")
    layers.set_defaults(func=cmd_layers)

    demo = sub.add_parser("demo", help="generate sample images and videos and run the demo jobs on them",
                          description="Three small jobs on generated data, each on an embedded local Ray: images, "
                          "videos, and clips told apart only by the order of events (an LSTM trained on them). "
                          "Sample data goes under demo-data/, outputs under out/, in the current folder.")
    demo.add_argument("--job", default=_demo_file("demo.yaml"), help="the image job (default: the packaged one)")
    demo.add_argument("--data", default="demo-data/images", help="where the sample images go")
    demo.add_argument("--images", type=int, default=300, help="how many sample images (default: 300)")
    demo.add_argument("--video-job", default=_demo_file("demo_video.yaml"),
                      help="the video job (default: the packaged one); '' to skip the video demo")
    demo.add_argument("--video-data", default="demo-data/videos", help="where the sample videos go")
    demo.add_argument("--videos", type=int, default=12, help="how many sample videos (default: 12)")
    demo.add_argument("--order-job", default=_demo_file("demo_order.yaml"),
                      help="the order demo's job (default: the packaged one); '' to skip the last demo: clips "
                      "told apart by the order of events, an LSTM trained on them")
    demo.add_argument("--order-train", default=_demo_file("demo_order_train.yaml"),
                      help="the order demo's training file (default: the packaged one)")
    demo.add_argument("--order-data", default="demo-data/order", help="where the order demo's clips go")
    demo.add_argument("--order-videos", type=int, default=64, help="how many order clips (default: 64)")
    demo.set_defaults(func=cmd_demo)
    from .index.index_commands import add_parsers as index_parsers
    index_parsers(sub)  # index, search, dedup
    from .pages.page_commands import add_parsers as pages_parsers
    pages_parsers(sub)  # report
    from .train.eval_commands import add_parsers as eval_parsers
    eval_parsers(sub)  # eval
    return parser


def _demo_file(name: str) -> str:
    """A demo job shipped inside the package (pipeline/jobs/; jobs/ in a checkout links to it), so
    `featurize demo` runs from any folder."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "jobs", name)


def _job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job file (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job key, e.g. --set model.arch=resnet18 (repeatable)")


def _console_arguments(parser: argparse.ArgumentParser, progress: str = "the progress line") -> None:
    """--quiet and --verbose: what goes to stderr besides errors (the summary on stdout stays)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true",
                       help=f"no progress on stderr ({progress}); the summary still prints")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="everything Ray prints (its logs, the workers' output, Ray Data's progress bars)")
    group.add_argument("--progress", dest="verbose", action="store_true", help=argparse.SUPPRESS)  # the old flag


def _load(job_path: str, overrides: List[str]):
    """(job, the mapping it was built from: overrides applied, relative local paths made absolute,
    as a driver elsewhere (submit, ray://) and Ray's workers need them). A bad job is refused here,
    naming the key."""
    raw = read_job_file(job_path)
    from .train.trainfile import is_training_file

    if is_training_file(raw):
        raise ConfigError(f"{job_path} is a training file (it has head:, no source:): run it with featurize train")
    from .submit import shipped_job

    data = shipped_job(raw, overrides, os.getcwd())
    return parse_job(data), data


def cmd_run(args: argparse.Namespace) -> int:
    from .output.record import format_summary

    code, summary = _run(args.job, args.overrides, args.address, progress=not args.quiet, verbose=args.verbose,
                         overwrite=args.overwrite, retry_failed=args.retry_failed, incremental=args.incremental)
    if summary is not None:
        print(format_summary(summary))
    return code


def _run(job_path: str, overrides: List[str], address: Optional[str], progress: bool = True, verbose: bool = False,
         **modes):
    """Run a job: (exit code, summary or None); a job that fails midway gets one line, one that
    cannot run is refused (raised for main)."""
    job, _ = _load(job_path, overrides)  # before the imports of Ray and torch: refused in well under a second
    from .progress import describe_job, starting

    starting(progress, describe_job(job))  # the imports below take seconds
    from .extract.runner import run_job

    try:
        return EXIT_OK, run_job(job, address=address, progress=progress, verbose=verbose, **modes)
    except Refused:
        raise
    except Exception as e:  # failed midway: the reason in one line, the details in Ray's logs
        return _failed(f"job {job.name}", e), None


def _failed(what: str, e: Exception) -> int:
    """A run or an apply that failed midway (what was committed is kept): say so, exit 1."""
    from .jobrun import failure_lines

    for line in failure_lines(what, e):
        _say(line)
    return EXIT_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    from .submit import submit
    from .train.trainfile import is_training_file

    # the whole file is checked here: a bad one never reaches the cluster
    if is_training_file(read_job_file(args.job)):
        job, data = _load_training(args.job, args.overrides)
    else:
        job, data = _load(args.job, args.overrides)
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise ConfigError("submit: no cluster given: pass --address http://HOST:8265 or set $RAY_API_SERVER_ADDRESS")
    return submit(job, data, address, args.wait, overwrite=args.overwrite)


def _load_training(path: str, overrides: List[str]):
    """(training config, the mapping a cluster is sent: overrides applied, local paths absolute)."""
    from .submit import shipped_job
    from .train.trainfile import parse_training

    data = shipped_job(read_job_file(path, "training file"), overrides, os.getcwd())
    return parse_training(data), data


def cmd_train(args: argparse.Namespace) -> int:
    cfg, _ = _load_training(args.job, args.overrides)  # before Ray and torch: a bad file is refused at once
    from .train.sweep_args import parse_sweep

    sweep = parse_sweep(args.sweep)  # a bad --sweep value too
    from .train.loop import train
    from .train.summary import format_training

    try:
        # epoch lines are its progress: on stderr, as run's line is; none with --quiet
        say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
        result = train(cfg, address=args.address, say=say, verbose=args.verbose, overwrite=args.overwrite,
                       sweep=sweep)
    except Refused:
        raise
    except Exception as e:
        _say(f"featurize: training {cfg.name} failed: {type(e).__name__}: {_last_line(e)}")
        _say("featurize: the epochs done are kept; run the same command again to resume")
        return EXIT_FAILED
    print(format_training(cfg, result))
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    from .progress import applying, starting

    starting(not args.quiet, applying(args.checkpoint, args.input, args.output))  # the imports below take seconds
    from .output.record import format_summary
    from .train.apply import apply_head

    out_options = None if args.output_storage_options is False else args.output_storage_options  # None: the input's
    try:
        summary = apply_head(args.checkpoint, args.input, args.output, name=args.name,
                             storage_options=args.storage_options, output_storage_options=out_options,
                             address=args.address, overwrite=args.overwrite,
                             allow_other_source=args.allow_other_source,
                             progress=not args.quiet, verbose=args.verbose)
    except Refused:
        raise
    except Exception as e:
        return _failed("apply", e)
    print(format_summary(summary))
    return EXIT_OK


def _last_line(e: Exception) -> str:
    return str(e).strip().splitlines()[-1] if str(e).strip() else ""


def cmd_status(args: argparse.Namespace) -> int:
    from .output.status import MEANING, status

    st = status(args.out, args.storage_options)
    print(f"output     {redact_text(args.out)}\n"
          f"job        {st['name'] or '(no record yet)'} ({MEANING.get(st['status'], st['status'])})\n"
          f"planned    {st['planned']}\n"
          f"committed  {st['features']} feature rows, {st['errors']} error rows\n"
          f"remaining  {st['remaining']} planned samples not yet committed\n"
          f"complete   {'yes' if st['complete'] else 'no: run the same command again to resume'}")
    if st["staged_files"]:
        print(f"staged     {st['staged_files']} files written but not published; the next run publishes them")
    if st["overwrite_pending"]:
        print(f"overwrite  an --overwrite run is under way in {redact_text(args.out)}/_overwrite; "
              "the old output stays until it completes")
    if st["duplicates"]:
        print(f"duplicates {st['duplicates']} sample ids committed more than once: not exactly once; "
              "rebuild with --overwrite")
    if st["lease"]:
        print(f"lease      {redact_text(st['lease'])}")
    return EXIT_OK if st["complete"] else EXIT_FAILED


def cmd_inspect(args: argparse.Namespace) -> int:
    from .output.record import inspect_output

    print(inspect_output(args.out, args.storage_options))
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from .models.catalog import format_models

    print(format_models(only=args.family))
    return EXIT_OK


def cmd_layers(args: argparse.Namespace) -> int:
    from .models.catalog import format_layers

    print(format_layers(args.arch, args.crop, args.family))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import check, claim
    from .samples import make_image_folder, make_video_folder

    folders = [(args.job, args.data, "--data")]
    if args.video_job:
        folders.append((args.video_job, args.video_data, "--video-data"))
    if args.order_job:
        folders.append((args.order_job, args.order_data, "--order-data"))
    for job, data, key in folders:  # every folder is checked before anything is written to any of them
        check(data, key)
        check(load_job(job).output.uri, f"{job}: output.uri")
    for folder, key in _order_outputs(args):
        check(folder, key)
    for _, data, key in folders:
        claim(data, key)
    counts = make_image_folder(args.data, n=args.images)
    print(f"sample data  {args.data}: {counts['images']} images in {counts['classes']} classes, "
          f"{counts['broken']} broken files among them")
    code = _demo_job(args.job, args.data)
    if code == EXIT_OK:
        from .pages.page_commands import demo_report
        demo_report(load_job(args.job).output.uri)
    if code != EXIT_OK or not args.video_job:
        return code
    counts = make_video_folder(args.video_data, n=args.videos)
    print(f"\nsample data  {args.video_data}: {counts['videos']} videos (MPEG-4 in AVI) in "
          f"{counts['classes']} classes, {counts['broken']} broken file among them")
    code = _demo_job(args.video_job, args.video_data)
    if code != EXIT_OK or not args.order_job:
        return code
    return _demo_order(args)


def _order_outputs(args: argparse.Namespace):
    """The order demo's trained head and applied table: the demo's own folders, replaced each run."""
    from .train.trainfile import load_training

    head = load_training(args.order_train).output.uri.rstrip("/")
    return [(head, f"{args.order_train}: output.uri"), (f"{head}-applied", f"{args.order_train}: output.uri-applied")]


def _demo_order(args: argparse.Namespace) -> int:
    """Frames in, a trained LSTM and a new table out; then how well each clip feature separates the classes."""
    from .demo import claim
    from .train.order_demo import order_loop

    def run(job_path: str, overrides: List[str]) -> None:
        claim(load_job(job_path).output.uri, f"{job_path}: output.uri", clear=True)
        code, summary = _run(job_path, overrides, None)
        if summary is None:
            raise SystemExit(code)
        print(format_summary(summary))

    from .output.record import format_summary

    print()
    for folder, key in _order_outputs(args):
        claim(folder, key, clear=True)
    try:
        accuracy = order_loop(args.order_job, args.order_train, args.order_data, args.order_videos, run,
                              say=lambda line: print(line, flush=True))
    except SystemExit as e:
        return int(e.code)
    except Refused:
        raise
    except Exception as e:  # a failure of the training or the apply: one line
        _say(f"featurize: {type(e).__name__}: {_last_line(e)}")
        return EXIT_FAILED
    print(f"\nheld-out clips, nearest-centroid accuracy of each clip feature (chance 0.50):\n"
          f"  mean over frames   {accuracy['mean']:.2f}   (the order is averaged away)\n"
          f"  trained LSTM       {accuracy['lstm']:.2f}")
    return EXIT_OK


def _demo_job(job_path: str, data: str) -> int:
    """Run one demo job on its generated data (replacing its own earlier output), then say how to read it."""
    from .demo import claim
    from .output.record import format_summary

    out = load_job(job_path).output.uri
    claim(out, f"{job_path}: output.uri", clear=True)
    code, summary = _run(job_path, [f"source.uri={data}"], None)
    if summary is None:
        return code
    print(format_summary(summary))
    print(
        "read it:\n"
        f"  featurize inspect {out}\n"
        f"  python -c \"import pyarrow.dataset as ds; "
        f"print(ds.dataset('{out}/features', partitioning='hive').to_table().to_pandas().head())\"\n"
        f"  python -c \"import duckdb; duckdb.sql(\\\"select split, label, count(*) from "
        f"read_parquet('{out}/features/**/*.parquet', hive_partitioning=true) group by all\\\").show()\""
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
