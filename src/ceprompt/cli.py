"""The ``ceprompt`` command: one verb per job, each implemented in its own module.

Errors the user can fix (:class:`~ceprompt.core.errors.CepromptError`) are printed as one
line and exit with status 1; argument mistakes exit with status 2 (argparse).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Callable, Sequence

from . import __version__
from .core.errors import CepromptError
from .core.ranges import POSITIVE_INT, Range, arg

Handler = Callable[[argparse.Namespace], int]
DEFAULT_MIN_FACE = "20px,2%"  # ceprompt.data.faces.DEFAULT_MIN_FACE, written as on the command line


def _cmd_convert(args: argparse.Namespace) -> int:
    from .weights.clip_files import convert_clip

    act = {"auto": None, "quickgelu": True, "gelu": False}[args.activation]
    loaded = convert_clip(args.src, args.dst, overwrite=args.overwrite, quick_gelu=act)
    print(f"{args.src} ({loaded.format}): {loaded.spec.describe()}")
    print(f"wrote {args.dst} and {args.dst.rsplit('.', 1)[0]}.json")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .verbs.doctor import run_doctor

    return run_doctor(args.arch)


def _train_config(args: argparse.Namespace):
    from .engine.train import training_config

    overrides = list(args.set or [])
    shortcuts = {"clip": "backbone.path", "init": "backbone.init", "data": "data.root", "device": "run.device",
                 "precision": "run.precision", "seed": "run.seed", "output_dir": "run.output_dir", "name": "run.name",
                 "workers": "data.workers", "threads": "run.threads"}
    for attr, key in shortcuts.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.deterministic:
        overrides.append("run.deterministic=true")
    if args.skip_bad_images:
        overrides.append("data.skip_bad_images=true")
    if args.no_progress:
        overrides.append("run.progress=false")
    if args.allow_outside_root:
        overrides.append("data.allow_outside_root=true")
    return training_config(args.config, args.resume, overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine.train import train

    cfg = _train_config(args)
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line, not one per process
        print(f"run directory: {run_dir}")
    return 0


def _zero_shot_config(dataset: str | None) -> str:
    """The shipped stage-1 config of the dataset (its prompts, head and CLIP), said out loud."""
    from .core.config import CONFIG_DIR

    name = f"{dataset or 'rafdb'}_stage1"
    name = name if (CONFIG_DIR / f"{name}.yaml").is_file() else "rafdb_stage1"
    logging.getLogger("ceprompt").info("zero-shot with the settings of the shipped config %s (prompt template, head, "
                                       "CLIP); --config chooses another", name)
    return name


def _cmd_eval(args: argparse.Namespace) -> int:
    from .core.config import load_config
    from .core.errors import ConfigError
    from .verbs.eval_job import run_eval

    zero_shot = None
    if args.zero_shot and args.checkpoint:
        raise ConfigError("--zero-shot evaluates the untrained CLIP and --checkpoint a trained model: give one of them")
    if args.zero_shot:
        overrides = list(args.set or []) + ([f"backbone.path={args.clip}"] if args.clip else [])
        config = args.config or _zero_shot_config(args.dataset)
        zero_shot = load_config(config, overrides)
    elif not args.checkpoint:
        raise ConfigError("give --checkpoint (a .safetensors checkpoint or a run directory), or --zero-shot")
    elif args.clip or args.config:
        raise ConfigError(f"{'--clip' if args.clip else '--config'} is for --zero-shot; a checkpoint records its own "
                          "backbone and settings")
    run_eval(args.data, checkpoint=None if args.zero_shot else args.checkpoint, zero_shot_config=zero_shot,
             dataset=args.dataset, split=args.split, out=args.out, overwrite=args.overwrite,
             batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision,
             progress=not args.no_progress, allow_outside_root=args.allow_outside_root,
             overrides=[] if args.zero_shot else list(args.set or []))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.report import format_table
    from .demo.run import run_demo

    results = run_demo(args.out, quick=args.quick, seed=args.seed, overwrite=args.overwrite, workers=args.workers,
                       progress=not args.no_progress, threads=args.threads, seeds=args.seeds,
                       precision=args.precision)
    print(format_table(results))
    print(f"report: {results['runs']['stage2'].rsplit('/', 1)[0]}/report  ({results['seconds']['total']:.0f} s)")
    return 0


def _cmd_make_demo_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .core.errors import ConfigError
    from .demo.faces import write_rafdb_dataset

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; choose another folder")
    write_rafdb_dataset(out, args.n_train, args.n_test, seed=args.seed, size=args.size, workers=args.workers)
    print(f"wrote {args.n_train} training and {args.n_test} test faces in the RAF-DB layout to {out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .api import load
    from .verbs.predict import plan_predict, run_predict

    plan = plan_predict(args.inputs, output=args.output, fmt=args.format, annotate_dir=args.annotate,
                        explain_dir=args.explain, video_stride=args.video_stride, overwrite=args.overwrite)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the model's notice is printed below, once, without a path
        rec = load(args.checkpoint, device=args.device, precision=args.precision,
                   detector_threshold=args.threshold, min_face_size=args.min_face)
    if rec.notice:
        print(f"ceprompt predict: note: {rec.notice}", file=sys.stderr)
    failed = run_predict(rec, plan, detect=args.detect, batch_size=args.batch_size, progress=not args.no_progress)
    if failed:
        print(f"ceprompt predict: {failed} file(s) failed; see the error column", file=sys.stderr)
    return 1 if failed else 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.format == "hub":
        from .verbs.export_hub import export_hub
        from .weights.hub import hub_command

        folder = export_hub(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote {folder}/model.safetensors, config.json and README.md; publish with: "
              f"{hub_command('upload')} ORG/NAME {folder}")
        return 0
    from .verbs.export_onnx import export_onnx

    check = export_onnx(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} (onnxruntime vs PyTorch: max difference {check['max_abs_diff']:.1e})")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare

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


def _cmd_import_official(args: argparse.Namespace) -> int:
    from .weights.official import import_official

    result = import_official(args.clip, args.stage1, args.dataset, args.out, stage2=args.stage2,
                             overwrite=args.overwrite)
    print(f"wrote {result.stage1}" + (f" and {result.stage2}" if result.stage2 else "")
          + f" (compat: authors; class words {', '.join(result.class_words)})")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from .api import load
    from .core.paths import output_file
    from .verbs.embed import embed_files, image_files, plot_tsne, save_npz

    out = output_file(args.output, args.overwrite, "--output")
    plot = output_file(args.plot, args.overwrite, "--plot") if args.plot else None
    files = image_files(args.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rec = load(args.checkpoint, device=args.device, precision=args.precision)
    features = embed_files(rec, files, detect=args.detect, batch_size=args.batch_size)
    save_npz(features, out)
    print(f"wrote {len(features['embeddings'])} face embeddings of {features['embeddings'].shape[1]} dimensions "
          f"to {out}")
    if plot:
        plot_tsne(features, rec.class_names, plot)
        print(f"t-SNE map: {plot}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .core.paths import output_file
    from .verbs.compare import compare, markdown, plot_f1, write_csv

    csv_path = output_file(args.csv, args.overwrite, "--csv") if args.csv else None
    plot_path = output_file(args.plot, args.overwrite, "--plot") if args.plot else None
    result = compare(args.runs)
    print(markdown(result), end="")
    if csv_path:
        write_csv(result, csv_path)
    if plot_path:
        plot_f1(result, plot_path)
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    import json

    from .core.io_utils import atomic_write
    from .core.paths import output_file
    from .data.check import check_data

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    json_path = output_file(args.json, overwrite=args.overwrite, option="--json") if args.json else None
    report = check_data(args.dataset, args.root, args.image_dir, classes, full=args.full, workers=args.workers,
                        allow_outside_root=args.allow_outside_root)
    print(report.format())
    if json_path:
        with atomic_write(json_path) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server.app import serve

    serve(args.checkpoint, host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 1_000_000),
          device=args.device, precision=args.precision, min_face=args.min_face,
          allow_origins=args.allow_origin or [], allow_hosts=args.allow_host or [],
          pixel_budget=int(args.pixels_in_flight * 1_000_000), max_connections=args.max_connections,
          header_timeout=args.header_timeout, keep_alive=args.keep_alive)
    return 0


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto: bf16 on GPUs and on CPUs with AMX or AVX512-BF16, else fp32 "
                        "(ceprompt doctor says which here)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    _add_precision(p)
    p.add_argument("--workers", type=arg(Range(0, 256, integer=True)), help="data loading processes")
    _add_threads(p)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=arg(Range(1, 1024, integer=True)), metavar="N",
                   help="CPU threads (default: the cores this process may use that other work leaves free)")


def _min_face(text: str):
    from .core.errors import ConfigError
    from .data.faces import MinFace

    try:
        return MinFace.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--min-face=")) from None


def _add_min_face(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-face", type=_min_face, default=DEFAULT_MIN_FACE, metavar="PX|PCT%",
                   help="smallest face searched for: pixels (20 or 20px, >= 12), a share of the image's shorter "
                        "side (2%%) or the larger of both (default %(default)s)")


def _add_pixel_limit(p: argparse.ArgumentParser) -> None:
    from .data.images import DEFAULT_MAX_PIXELS

    p.add_argument("--max-pixels", type=arg(POSITIVE_INT), metavar="N",
                   help=f"refuse images with more pixels than this, read from the header before decoding "
                        f"(default {DEFAULT_MAX_PIXELS:,}, or $CEPROMPT_MAX_PIXELS)")


def _add_outside_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept index paths that are absolute or leave the dataset root through '..'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ceprompt",
        description="CEPrompt facial expression recognition on CLIP: train, evaluate, predict.",
    )
    parser.add_argument("--version", action="version", version=f"ceprompt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("convert", help="copy a CLIP checkpoint (any format) to safetensors + JSON sidecar")
    p.add_argument("src", help="OpenAI .pt archive, state dict (.pt/.bin/.safetensors) or Hugging Face folder")
    p.add_argument("dst", help="output file ending in .safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--activation", choices=["auto", "quickgelu", "gelu"], default="auto",
                   help="MLP activation where the file does not record it (auto: QuickGELU, as OpenAI's)")
    p.set_defaults(handler=_cmd_convert)

    p = verbs.add_parser("train", help="train stage 1 (eva) or stage 2 (cat); torchrun for many GPUs")
    p.add_argument("--config", help="YAML file or shipped name (rafdb_stage1, affectnet7_stage2, ...)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--clip", help="CLIP weights (backbone.path): a file, a folder or a name such as ViT-B-16, "
                                  "ViT-L-14:openai or hf-hub:ORG/NAME")
    p.add_argument("--data", help="dataset root (data.root)")
    p.add_argument("--init", help="stage 2: the stage-1 checkpoint or run directory (backbone.init)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--output-dir", help="parent folder of run directories (run.output_dir)")
    p.add_argument("--name", help="run directory name (run.name)")
    p.add_argument("--seed", type=arg(Range(0, 2**32 - 1, integer=True)), help="random seed (run.seed)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms for exact reruns")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="decode every image first and leave unreadable ones out (listed in the run's "
                        "skipped_images.txt) instead of refusing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (run.progress=false)")
    _add_outside_root(p)
    _add_pixel_limit(p)
    _add_runtime_args(p)
    p.set_defaults(handler=_cmd_train)

    p = verbs.add_parser("embed", help="the model's image embedding of every face, for t-SNE/UMAP figures")
    p.add_argument("checkpoint", help="checkpoint .safetensors, run directory, model folder or hf-hub:ORG/NAME")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="images or folders (searched recursively)")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="the .npz file to write")
    p.add_argument("--plot", metavar="FILE", help="also draw a t-SNE map (PNG; needs scikit-learn)")
    p.add_argument("--detect", choices=["mtcnn", "none"], default="mtcnn",
                   help="find faces with MTCNN (default) or take each image as one face crop")
    p.add_argument("--batch-size", type=arg(POSITIVE_INT), default=32, help="faces per forward pass (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_pixel_limit(p)
    _add_runtime_args(p)
    p.set_defaults(handler=_cmd_embed, device="auto", precision="auto")

    p = verbs.add_parser("compare", help="runs or evaluations side by side: metrics, the settings that differ, "
                                         "McNemar's test and a bootstrap interval on the same test images")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_EVAL_DIR",
                   help="training runs, `eval --out` folders, or folders of runs (a `demo --seeds N` folder)")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.add_argument("--plot", metavar="FILE", help="also draw per-class F1 side by side (PNG)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --csv/--plot files")
    p.set_defaults(handler=_cmd_compare)

    p = verbs.add_parser("check-data", help="report every problem of a dataset at once, with a summary")
    p.add_argument("root", help="dataset root")
    p.add_argument("--dataset", required=True, help="rafdb, affectnet7, affectnet8, ferplus or folder")
    p.add_argument("--image-dir", help="rafdb: image folder under the root (default Image/aligned_224)")
    p.add_argument("--classes", help="folder datasets: class order, comma-separated")
    p.add_argument("--full", action="store_true", help="decode every image completely (slower, catches truncation)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON (a new file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--workers", type=arg(Range(1, 256, integer=True)), default=8, help="threads opening images")
    _add_outside_root(p)
    _add_pixel_limit(p)
    p.set_defaults(handler=_cmd_check_data)

    p = verbs.add_parser("eval", help="evaluate a checkpoint (or zero-shot CLIP) on a dataset: metrics, "
                         "confusion matrix, predictions")
    p.add_argument("--checkpoint", help="checkpoint .safetensors, or a run directory (its best checkpoint)")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--dataset", help="rafdb, affectnet7, affectnet8, ferplus or folder (default: the checkpoint's)")
    p.add_argument("--split", choices=["test", "train"], default="test", help="which split to evaluate (default test)")
    p.add_argument("--out", help="report folder (default runs/eval-<time>)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty report folder")
    p.add_argument("--batch-size", type=arg(POSITIVE_INT), default=64, help="images per forward pass (default 64)")
    p.add_argument("--zero-shot", action="store_true", help="plain CLIP with the stage-1 prompts (baseline)")
    p.add_argument("--config", help="zero-shot: config giving backbone/head/prompt settings")
    p.add_argument("--clip", help="zero-shot: CLIP weights (backbone.path)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="zero-shot: any config override; a checkpoint: eva.raw_text_at_eval=true (the authors' "
                        "stage-1 test scoring)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_outside_root(p)
    _add_pixel_limit(p)
    _add_runtime_args(p)
    p.set_defaults(handler=_cmd_eval, device="auto", precision="auto", workers=4)

    p = verbs.add_parser("predict", help="expressions of every face in images, folders and videos")
    p.add_argument("checkpoint", help="checkpoint .safetensors, run directory, model folder or hf-hub:ORG/NAME")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="images, videos or folders (searched recursively)")
    p.add_argument("--output", "-o", default="-", help="CSV or .jsonl file (default: CSV on stdout)")
    p.add_argument("--format", choices=["csv", "jsonl"], help="default: from the output's suffix, else csv")
    p.add_argument("--detect", choices=["mtcnn", "none"], default="mtcnn",
                   help="find faces with MTCNN (default) or take each image as one face crop")
    p.add_argument("--annotate", metavar="DIR", help="write images/videos with boxes and labels here")
    p.add_argument("--explain", metavar="DIR", help="write a heat map of the evidence per face here")
    p.add_argument("--video-stride", type=arg(POSITIVE_INT), default=5,
                   help="classify every N-th video frame (default 5)")
    p.add_argument("--batch-size", type=arg(POSITIVE_INT), default=32, help="faces per forward pass (default 32)")
    p.add_argument("--threshold", type=arg(Range(0, 1, lo_open=True)), default=0.9,
                   help="face detector confidence threshold, in (0, 1] (default 0.9)")
    _add_min_face(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file, and earlier pictures in --annotate and --explain")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_pixel_limit(p)
    _add_runtime_args(p)
    p.set_defaults(handler=_cmd_predict, device="auto", precision="auto")

    p = verbs.add_parser("export", help="export a trained model: an ONNX graph, or a folder for the Hugging Face Hub")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    q = formats.add_parser("onnx", help="one ONNX graph: RGB face crops in, class probabilities out")
    q.add_argument("checkpoint", help="checkpoint .safetensors, run directory or model folder")
    q.add_argument("out", help="a file ending in .onnx (a .json description is written beside it)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_threads(q)
    q.set_defaults(handler=_cmd_export)
    q = formats.add_parser("hub", help="a self-contained folder for the Hugging Face Hub (weights, config, card)")
    q.add_argument("checkpoint", help="checkpoint .safetensors, run directory or model folder")
    q.add_argument("out", help="a folder: model.safetensors, config.json, README.md")
    q.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="weight precision (default fp16)")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier export in that folder")
    _add_threads(q)
    q.set_defaults(handler=_cmd_export)

    p = verbs.add_parser("prepare", help="convert an official dataset distribution to ceprompt's index files")
    p.add_argument("dataset", choices=["rafdb", "affectnet", "ferplus"], help="which distribution SRC is")
    p.add_argument("src", help="the dataset as distributed")
    p.add_argument("dst", help="where the index (and aligned faces) go; may be SRC itself")
    p.add_argument("--align", action="store_true", help="re-cut every face with MTCNN (needs ceprompt[face])")
    p.add_argument("--skip-bad-rows", action="store_true", help="leave malformed rows out instead of failing")
    p.add_argument("--valid", choices=["skip", "train", "test"], default="skip",
                   help="FERPlus PublicTest rows: leave out (default), or add to train or test")
    p.add_argument("--overwrite", action="store_true", help="replace existing index files")
    p.add_argument("--device", help="device for --align (cpu or cuda)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_pixel_limit(p)
    _add_threads(p)
    p.set_defaults(handler=_cmd_prepare)

    p = verbs.add_parser("import-official", help="check the authors' released checkpoints and write them as "
                         "ceprompt checkpoints (authors-compatible mode)")
    p.add_argument("--clip", required=True, help="the CLIP the authors trained on (OpenAI's ViT-B-16)")
    p.add_argument("--stage1", required=True, help="the authors' stage-1 file (model_epoch_N.pth)")
    p.add_argument("--stage2", help="the authors' stage-2 file")
    p.add_argument("--dataset", required=True, choices=["rafdb", "affectnet7", "affectnet8"],
                   help="the dataset the files were trained on (their class words differ)")
    p.add_argument("--out", required=True, help="folder for stage1.safetensors (and stage2.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier import in --out")
    p.set_defaults(handler=_cmd_import_official)

    p = verbs.add_parser("serve", help="a local web page (and JSON API) to try a model on photos")
    p.add_argument("checkpoint", nargs="?", help="checkpoint, run directory, model folder or hf-hub:ORG/NAME "
                                                 "(default: your runs/demo model, else the cached demo model)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=arg(Range(0, 65535, integer=True)), default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=arg(Range(0, 10_000, lo_open=True)), default=10.0,
                   help="largest accepted upload (default 10 MB)")
    p.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="also accept browser requests from this origin, e.g. https://lab.example.org "
                        "(repeatable; default: same origin only)")
    p.add_argument("--allow-host", action="append", metavar="NAME",
                   help="also accept this Host header (repeatable; default: the listening address, loopback "
                        "names and, on 0.0.0.0, this machine's names and IP addresses)")
    p.add_argument("--pixels-in-flight", type=arg(Range(1, 100_000, lo_open=False)), default=120, metavar="MP",
                   help="decoded megapixels all requests may hold at once; more uploads get 503 (default 120)")
    p.add_argument("--max-connections", type=arg(Range(1, 100_000, integer=True)), default=128,
                   help="open connections at once, capped by the file-descriptor limit (default 128)")
    p.add_argument("--header-timeout", type=arg(Range(0, 3600, lo_open=True)), default=10.0, metavar="S",
                   help="seconds a connection has to send its request headers (default 10)")
    p.add_argument("--keep-alive", type=arg(Range(0, 3600, lo_open=True)), default=5.0, metavar="S",
                   help="seconds an idle connection stays open after a response (default 5)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _add_precision(p)
    _add_min_face(p)
    _add_pixel_limit(p)
    _add_threads(p)
    p.set_defaults(handler=_cmd_serve, precision="auto")

    p = verbs.add_parser("demo", help="the whole method on generated faces and a small CLIP, on a CPU, in minutes "
                         "(README: The demo, for measured times)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true",
                   help="less data and shorter training, with the full demo's CLIP when it is cached, else a "
                        "quicker one pretrained (and cached) first")
    p.add_argument("--seed", type=arg(Range(0, 2**31 - 1, integer=True)), default=0,
                   help="seed of the data, the demo CLIP's pretraining and the runs (default 0)")
    p.add_argument("--seeds", type=arg(Range(1, 100, integer=True)), default=1, metavar="N",
                   help="train both stages with N seeds (seed, seed+1, ...) and report mean ± std (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo folder (only one ceprompt made)")
    p.add_argument("--workers", type=arg(Range(0, 64, integer=True)), default=2,
                   help="processes for data generation and loading")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_precision(p)
    _add_threads(p)
    p.set_defaults(handler=_cmd_demo, precision="auto")

    p = verbs.add_parser("make-demo-data", help="write generated expression faces in the RAF-DB layout")
    p.add_argument("out", help="output folder (must be new or empty)")
    p.add_argument("--n-train", type=arg(Range(1, 10_000_000, integer=True)), default=2100,
                   help="training faces, spread evenly over the 7 classes (default 2100)")
    p.add_argument("--n-test", type=arg(Range(1, 10_000_000, integer=True)), default=700,
                   help="test faces (default 700)")
    p.add_argument("--seed", type=arg(Range(0, 2**31 - 1, integer=True)), default=0,
                   help="the same seed gives the same faces (default 0)")
    p.add_argument("--size", type=arg(Range(16, 4096, integer=True)), default=64,
                   help="image side in pixels (default 64)")
    p.add_argument("--workers", type=arg(Range(1, 64, integer=True)), default=2,
                   help="processes drawing faces (default 2)")
    p.set_defaults(handler=_cmd_make_demo_data)

    p = verbs.add_parser("doctor", help="report versions and devices; round-trip a tiny CLIP through every format")
    p.add_argument("--arch", default="tiny-vit", help="architecture to round-trip (default: tiny-vit)")
    p.set_defaults(handler=_cmd_doctor)
    return parser


def _quiet_stdout() -> None:
    """After a failed write to stdout, point it at /dev/null: Python's flush at exit would fail again, loudly."""
    try:
        sys.stdout.flush()
    except OSError:
        sys.stdout = open(os.devnull, "w")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else list(argv)):  # plain `ceprompt`: what it can do
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    # ceprompt's own messages at INFO; other libraries (onnxscript, onnx_ir, ...) only when they warn
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("ceprompt").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    handler: Handler = args.handler
    from .data.images import pixel_limit

    try:
        if hasattr(args, "threads") and args.verb not in ("train", "demo"):  # those two manage threads per run
            from .engine.threads import set_threads

            set_threads(args.threads)
        with pixel_limit(getattr(args, "max_pixels", None)):
            return handler(args)
    except CepromptError as exc:
        print(f"ceprompt {args.verb}: error: {exc}", file=sys.stderr)
        _quiet_stdout()
        return 1
    except OSError as exc:  # the system refused a write or a read: a full disk, a closed pipe, a lost mount
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"ceprompt {args.verb}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        _quiet_stdout()
        return 1
    except KeyboardInterrupt:
        print(f"ceprompt {args.verb}: interrupted", file=sys.stderr)
        return 130
