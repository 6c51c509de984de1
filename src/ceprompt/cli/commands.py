"""What each ``ceprompt`` verb does with its parsed arguments (the parser is in :mod:`ceprompt.cli.parser`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def compute_threads(args: argparse.Namespace) -> None:
    """CPU threads for a verb that computes (``--threads``, else from the cores other work leaves free), set once
    its arguments have passed the checks that need no torch (train and demo manage threads per run)."""
    from ..engine.threads import set_threads

    set_threads(getattr(args, "threads", None))


def run_convert(args: argparse.Namespace) -> int:
    from ..weights.clip_files import convert_clip

    act = {"auto": None, "quickgelu": True, "gelu": False}[args.activation]
    loaded = convert_clip(args.src, args.dst, overwrite=args.overwrite, quick_gelu=act)
    print(f"{args.src} ({loaded.format}): {loaded.spec.describe()}")
    print(f"wrote {args.dst} and {args.dst.rsplit('.', 1)[0]}.json")
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    from ..verbs.doctor import run_doctor

    return run_doctor(args.arch)


# Command-line shortcuts of `train` and the config keys they set (typed values, never re-parsed as text).
TRAIN_SHORTCUTS = {"clip": "backbone.path", "init": "backbone.init", "data": "data.root", "device": "run.device",
                   "precision": "run.precision", "seed": "run.seed", "output_dir": "run.output_dir", "name": "run.name",
                   "workers": "data.workers", "threads": "run.threads"}
TRAIN_SWITCHES = {"deterministic": ("run.deterministic", True), "skip_bad_images": ("data.skip_bad_images", True),
                  "no_progress": ("run.progress", False), "allow_outside_root": ("data.allow_outside_root", True)}


def _train_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..engine.train import training_config

    values = {key: getattr(args, attr) for attr, key in TRAIN_SHORTCUTS.items()
              if getattr(args, attr, None) is not None}
    values.update(dict(value for attr, value in TRAIN_SWITCHES.items() if getattr(args, attr)))
    return training_config(args.config, args.resume, list(args.set or []), values)


def run_train(args: argparse.Namespace) -> int:
    from ..engine.train import train

    cfg = _train_config(args)
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per process
        print(f"run directory: {run_dir}")
    return 0


def _zero_shot_config(dataset: str | None) -> str:
    """The shipped stage-1 config of the dataset (its prompts, head and CLIP), said out loud."""
    from ..experiment.config import CONFIG_DIR

    name = f"{dataset or 'rafdb'}_stage1"
    name = name if (CONFIG_DIR / f"{name}.yaml").is_file() else "rafdb_stage1"
    logging.getLogger("ceprompt").info("zero-shot with the settings of the shipped config %s (prompt template, head, "
                                       "CLIP); --config chooses another", name)
    return name


def run_eval(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError

    if args.zero_shot and args.checkpoint:
        raise ConfigError("--zero-shot evaluates the untrained CLIP and --checkpoint a trained model: give one of them")
    if args.zero_shot and (args.classes or args.class_alias):
        raise ConfigError("--classes and --class-alias are for a trained --checkpoint; --zero-shot scores the "
                          "dataset's own classes")
    if not args.out:
        return _eval_checked(args)
    from ..core.paths import output_dir, removed_on_failure

    with removed_on_failure(args.out):  # the folder checked (so created) first, gone again if anything fails
        output_dir(args.out, "--out", must_be_empty=True, overwrite=args.overwrite)
        return _eval_checked(args)


def _eval_checked(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..core.errors import ConfigError, DataError

    zero_shot = None
    if not args.zero_shot and args.checkpoint:
        check_model(args.checkpoint)
    if not Path(args.data).expanduser().is_dir():
        raise DataError(f"{args.data}: dataset root folder not found")
    compute_threads(args)
    from ..experiment.config import load_config
    from ..verbs.eval_job import run_eval

    if args.zero_shot:
        config = args.config or _zero_shot_config(args.dataset)
        zero_shot = load_config(config, list(args.set or []), {"backbone.path": args.clip} if args.clip else None)
    elif not args.checkpoint:
        raise ConfigError("give --checkpoint (a .safetensors checkpoint or a run directory), or --zero-shot")
    elif args.clip or args.config:
        raise ConfigError(f"{'--clip' if args.clip else '--config'} is for --zero-shot; a checkpoint records its own "
                          "backbone and settings")
    run_eval(args.data, checkpoint=None if args.zero_shot else args.checkpoint, zero_shot_config=zero_shot,
             dataset=args.dataset, split=args.split, out=args.out, overwrite=args.overwrite,
             batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision,
             progress=not args.no_progress, allow_outside_root=args.allow_outside_root,
             overrides=[] if args.zero_shot else list(args.set or []), classes=args.classes,
             class_aliases=args.class_alias)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from ..demo.report import format_table
    from ..demo.run import run_demo

    results = run_demo(args.out, quick=args.quick, seed=args.seed, overwrite=args.overwrite, workers=args.workers,
                       progress=not args.no_progress, threads=args.threads, seeds=args.seeds,
                       precision=args.precision)
    print(format_table(results))
    print(f"report: {results['runs']['stage2'].rsplit('/', 1)[0]}/report  ({results['seconds']['total']:.0f} s)")
    return 0


def run_make_demo_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..core.errors import ConfigError
    from ..demo.faces import write_rafdb_dataset

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; choose another folder")
    write_rafdb_dataset(out, args.n_train, args.n_test, seed=args.seed, size=args.size, workers=args.workers)
    print(f"wrote {args.n_train} training and {args.n_test} test faces in the RAF-DB layout to {out}")
    return 0


def check_model(value: str) -> None:
    """A model argument that cannot be one, refused before torch loads (seconds on a CPU)."""
    from pathlib import Path

    from ..core.errors import CheckpointError

    if not value.startswith("hf-hub:") and not Path(value).expanduser().exists():
        raise CheckpointError(f"{value}: no such checkpoint, run directory or model folder")


def run_predict(args: argparse.Namespace) -> int:
    from ..verbs.predict_plan import check_extras, plan_predict

    plan = plan_predict(args.inputs, output=args.output, fmt=args.format, annotate_dir=args.annotate,
                        explain_dir=args.explain, video_stride=args.video_stride, overwrite=args.overwrite,
                        fps=args.fps, smooth=args.smooth, track_memory=args.track_memory, summary=args.summary,
                        timeline_dir=args.timeline)
    check_extras(plan, args.detect)
    check_model(args.checkpoint)
    compute_threads(args)
    from ..api import load
    from ..core.runtime import setup_runtime, teardown_runtime
    from ..verbs.predict import run_predict

    rt = setup_runtime(args.device, args.precision)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the model's notice is printed below, once, without a path
            rec = load(args.checkpoint, device=str(rt.device), precision=rt.precision,
                       detector_threshold=args.threshold, min_face_size=args.min_face, classes=args.classes,
                       class_aliases=args.class_alias, threads=args.threads)
        for note in (rec.notice, rec.classes_note) if rt.is_main else ():
            if note:
                print(f"ceprompt predict: note: {note}", file=sys.stderr)
        failed = run_predict(rec, plan, detect=args.detect, batch_size=args.batch_size,
                             progress=not args.no_progress, rt=rt)
    finally:
        teardown_runtime(rt)
    if failed and rt.is_main:
        print(f"ceprompt predict: {failed} file(s) failed; see the error column", file=sys.stderr)
    return 1 if failed else 0


def run_export(args: argparse.Namespace) -> int:
    check_model(args.checkpoint)
    compute_threads(args)
    if args.format == "hub":
        from ..verbs.export_hub import export_hub
        from ..weights.hub import hub_command

        folder = export_hub(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote {folder}/model.safetensors, config.json and README.md; publish with: "
              f"{hub_command('upload')} ORG/NAME {folder}")
        return 0
    from ..verbs.export_onnx import export_onnx

    check = export_onnx(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} (onnxruntime vs PyTorch: max difference {check['max_abs_diff']:.1e})")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    compute_threads(args)
    from ..data.prepare import prepare

    summary = prepare(args.dataset, args.src, args.dst, align=args.align, skip_bad_rows=args.skip_bad_rows,
                      overwrite=args.overwrite, valid_as=args.valid, device=args.device or "cpu",
                      progress=not args.no_progress)
    print(f"{summary['dataset']}: {summary['train']} training and {summary['test']} test images indexed in "
          f"{summary['destination']}")
    for reason, count in summary["left_out"].items():
        print(f"  left out by the protocol: {count} ({reason})")
    if summary["skipped_rows"]:
        print(f"  skipped {len(summary['skipped_rows'])} malformed row(s):")
        for line in summary["skipped_rows"]:
            print(f"    {line}")
    for note in summary["alignment_notes"]:
        print(f"  {note}")
    return 0


def run_import_official(args: argparse.Namespace) -> int:
    from ..weights.official import import_official

    result = import_official(args.clip, args.stage1, args.dataset, args.out, stage2=args.stage2,
                             overwrite=args.overwrite)
    print(f"wrote {result.stage1}" + (f" and {result.stage2}" if result.stage2 else "")
          + f" (compat: authors; class words {', '.join(result.class_words)})")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from ..core.errors import CepromptError
    from ..core.extras import DETECTORS, installed, require
    from ..core.outputs import OutputFile, distinct_outputs
    from ..verbs.predict_plan import expand_inputs

    distinct_outputs(("--output", args.output), ("--plot", args.plot))
    out = OutputFile(args.output, args.overwrite, "--output")
    plot = OutputFile(args.plot, args.overwrite, "--plot") if args.plot else None
    if plot is not None and not installed("sklearn"):
        raise CepromptError("--plot needs scikit-learn: pip install scikit-learn")
    require(list(DETECTORS[args.detect]), f"--detect {args.detect}")
    from ..data.images import IMAGE_SUFFIXES

    files = expand_inputs(args.inputs, IMAGE_SUFFIXES)
    if not files:
        raise CepromptError(f"no images in {list(args.inputs)}")
    check_model(args.checkpoint)
    compute_threads(args)
    from ..api import load
    from ..core.runtime import setup_runtime, teardown_runtime
    from ..verbs.embed import plot_tsne, run_embed

    rt = setup_runtime(args.device, args.precision)
    claims = [c for c in (out, plot) if c is not None] if rt.is_main else []
    try:
        for claim in claims:
            claim.claim()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            rec = load(args.checkpoint, device=str(rt.device), precision=rt.precision, threads=args.threads)
        features, failed = run_embed(rec, files, out, detect=args.detect, batch_size=args.batch_size,
                                     progress=not args.no_progress, rt=rt)
        if features is None:  # another torchrun process: rank 0 writes and reports
            return 0
        print(f"wrote {len(features['embeddings'])} face embeddings of {features['embeddings'].shape[1]} dimensions "
              f"to {out.path}")
        if plot is not None:
            plot.write_with(lambda tmp: plot_tsne(features, rec.class_names, tmp,
                                                  (rec.meta.get("config") or {}).get("data", {}).get("class_aliases")))
            print(f"t-SNE map: {plot.path}")
        if failed:
            print(f"ceprompt embed: {failed} file(s) could not be read (named above); their faces are not in "
                  f"{out.path}", file=sys.stderr)
        return 1 if failed else 0
    finally:
        for claim in claims:
            claim.release()
        teardown_runtime(rt)


def run_compare(args: argparse.Namespace) -> int:
    from ..core.paths import output_file
    from ..verbs.compare import compare, markdown, plot_f1, write_csv

    csv_path = output_file(args.csv, args.overwrite, "--csv") if args.csv else None
    plot_path = output_file(args.plot, args.overwrite, "--plot") if args.plot else None
    result = compare(args.runs)
    print(markdown(result), end="")
    if csv_path:
        write_csv(result, csv_path)
    if plot_path:
        plot_f1(result, plot_path)
    return 0


def run_check_data(args: argparse.Namespace) -> int:
    import json

    from ..core.io_utils import atomic_write
    from ..core.paths import output_file
    from ..data.check import check_data

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    json_path = output_file(args.json, overwrite=args.overwrite, option="--json") if args.json else None
    report = check_data(args.dataset, args.root, args.image_dir, classes, full=args.full, workers=args.workers,
                        allow_outside_root=args.allow_outside_root)
    print(report.format())
    if json_path:
        with atomic_write(json_path) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


def run_serve(args: argparse.Namespace) -> int:
    if args.checkpoint:
        check_model(args.checkpoint)
    compute_threads(args)
    from ..server.app import serve

    serve(args.checkpoint, host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 1_000_000),
          device=args.device, precision=args.precision, min_face=args.min_face,
          allow_origins=args.allow_origin or [], allow_hosts=args.allow_host or [],
          pixel_budget=int(args.pixels_in_flight * 1_000_000), max_connections=args.max_connections,
          header_timeout=args.header_timeout, keep_alive=args.keep_alive, classes=args.classes,
          class_aliases=args.class_alias, max_faces=args.max_faces, per_client=args.max_connections_per_client,
          batch_window=args.batch_window, threads=args.threads)
    return 0
