"""The ``ceprompt`` argument parser: one sub-command per verb, the options they share."""

from __future__ import annotations

import argparse

from .. import __version__
from ..core.extras import DETECTORS
from ..core.ranges import POSITIVE_INT, THREADS, Range, arg
from . import commands

DEFAULT_MIN_FACE = "20px,2%"  # ceprompt.data.faces.DEFAULT_MIN_FACE, written as on the command line


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
    p.add_argument("--threads", type=arg(THREADS), metavar="N",
                   help="CPU threads (default: the cores this process may use that other work leaves free)")


def _min_face(text: str):
    from ..core.errors import ConfigError
    from ..data.faces import MinFace

    try:
        return MinFace.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--min-face=")) from None


def _add_detect(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detect", choices=list(DETECTORS), default="mtcnn",
                   help="the face detector: mtcnn (default), centerface (pip install 'ceprompt[centerface]'; finds "
                        "more turned faces, README: Face detection) or none (each image is one face crop)")


def _add_min_face(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-face", type=_min_face, default=DEFAULT_MIN_FACE, metavar="PX|PCT%",
                   help="smallest face searched for: pixels (20 or 20px, >= 12), a share of the image's shorter "
                        "side (2%%) or the larger of both (default %(default)s)")


def _add_pixel_limit(p: argparse.ArgumentParser) -> None:
    from ..data.images import DEFAULT_MAX_PIXELS

    p.add_argument("--max-pixels", type=arg(POSITIVE_INT), metavar="N",
                   help=f"refuse images with more pixels than this, read from the header before decoding "
                        f"(default {DEFAULT_MAX_PIXELS:,}, or $CEPROMPT_MAX_PIXELS)")


def _class_list(text: str) -> list[str]:
    from ..core.errors import ConfigError
    from ..data.class_names import check_class_list

    try:
        return check_class_list([part for part in text.split(",")], "--classes")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--classes: ")) from None


def _class_alias(text: str) -> str:
    from ..core.errors import ConfigError
    from ..data.class_names import parse_aliases

    try:
        parse_aliases([text], "--class-alias")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--class-alias: ")) from None
    return text


def _add_classes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", type=_class_list, metavar="A,B,C",
                   help="score exactly these classes, named as given: trained ones (by name or alias) with their "
                        "trained prompts, others from their own words (default: the model's classes)")
    p.add_argument("--class-alias", action="append", type=_class_alias, metavar="ALIAS=CLASS",
                   help="another name of a class, beside the built-in table (angry=anger, joy=happy, ...); repeatable")


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
    p.set_defaults(verb_parser=p, handler=commands.run_convert)

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
    p.set_defaults(verb_parser=p, handler=commands.run_train)

    p = verbs.add_parser("embed", help="the model's image embedding of every face, for t-SNE/UMAP figures")
    p.add_argument("checkpoint", help="checkpoint .safetensors, run directory, model folder or hf-hub:ORG/NAME")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="images or folders (searched recursively)")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="the .npz file to write")
    p.add_argument("--plot", metavar="FILE", help="also draw a t-SNE map (PNG; needs scikit-learn)")
    _add_detect(p)
    p.add_argument("--batch-size", type=arg(POSITIVE_INT), default=32, help="faces per forward pass (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_pixel_limit(p)
    _add_runtime_args(p)
    p.set_defaults(verb_parser=p, handler=commands.run_embed, device="auto", precision="auto")

    p = verbs.add_parser("compare", help="runs or evaluations side by side: metrics, the settings that differ, "
                                         "McNemar's test and a bootstrap interval on the same test images")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_EVAL_DIR",
                   help="training runs, `eval --out` folders, or folders of runs (a `demo --seeds N` folder)")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.add_argument("--plot", metavar="FILE", help="also draw per-class F1 side by side (PNG)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --csv/--plot files")
    p.set_defaults(verb_parser=p, handler=commands.run_compare)

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
    p.set_defaults(verb_parser=p, handler=commands.run_check_data)

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
    _add_classes(p)
    p.set_defaults(verb_parser=p, handler=commands.run_eval, device="auto", precision="auto", workers=4)

    p = verbs.add_parser("predict", help="expressions of every face in images, folders and videos")
    p.add_argument("checkpoint", help="checkpoint .safetensors, run directory, model folder or hf-hub:ORG/NAME")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="images, videos or folders (searched recursively)")
    p.add_argument("--output", "-o", default="-", help="CSV or .jsonl file (default: CSV on stdout)")
    p.add_argument("--format", choices=["csv", "jsonl"], help="default: from the output's suffix, else csv")
    _add_detect(p)
    p.add_argument("--annotate", metavar="DIR", help="write images/videos with boxes and labels here")
    p.add_argument("--explain", metavar="DIR", help="write a heat map of the evidence per face here")
    p.add_argument("--video-stride", type=arg(POSITIVE_INT),
                   help="classify every N-th video frame (default 5 unless --fps is given)")
    p.add_argument("--fps", type=arg(Range(0, 1000, lo_open=True)), metavar="F",
                   help="classify F video frames per second, whatever the source's frame rate")
    p.add_argument("--smooth", type=arg(Range(0, 3600)), metavar="SECONDS",
                   help="time constant of the smoothing of each face's expression along its track (default 0.5; "
                        "0: off); rows keep the frame's own result beside the smoothed one")
    p.add_argument("--track-memory", type=arg(Range(0, 3600, lo_open=True)), metavar="SECONDS",
                   help="how long a face hidden or missed keeps its track id (default 3)")
    p.add_argument("--summary", metavar="FILE",
                   help="per video and track: times, sampled frames, dominant expression, share of each class, mean "
                        "probabilities (CSV, or JSON when FILE ends in .json)")
    p.add_argument("--timeline", metavar="DIR", help="one PNG per video: each track's smoothed expression over time")
    p.add_argument("--batch-size", type=arg(POSITIVE_INT), default=32, help="faces per forward pass (default 32)")
    p.add_argument("--threshold", type=arg(Range(0, 1, lo_open=True)), default=None,
                   help="face detector confidence threshold, in (0, 1] (default: MTCNN 0.9, CenterFace 0.5)")
    _add_min_face(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file, and earlier pictures in --annotate and --explain")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_pixel_limit(p)
    _add_runtime_args(p)
    _add_classes(p)
    p.set_defaults(verb_parser=p, handler=commands.run_predict, device="auto", precision="auto")

    p = verbs.add_parser("export", help="export a trained model: an ONNX graph, or a folder for the Hugging Face Hub")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    q = formats.add_parser("onnx", help="one ONNX graph: RGB face crops in, class probabilities out")
    q.add_argument("checkpoint", help="checkpoint .safetensors, run directory or model folder")
    q.add_argument("out", help="a file ending in .onnx (a .json description is written beside it)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_threads(q)
    q.set_defaults(verb_parser=q, handler=commands.run_export)
    q = formats.add_parser("hub", help="a self-contained folder for the Hugging Face Hub (weights, config, card)")
    q.add_argument("checkpoint", help="checkpoint .safetensors, run directory or model folder")
    q.add_argument("out", help="a folder: model.safetensors, config.json, README.md")
    q.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="weight precision (default fp16)")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier export in that folder")
    _add_threads(q)
    q.set_defaults(verb_parser=q, handler=commands.run_export)

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
    p.set_defaults(verb_parser=p, handler=commands.run_prepare)

    p = verbs.add_parser("import-official", help="check the authors' released checkpoints and write them as "
                         "ceprompt checkpoints (authors-compatible mode)")
    p.add_argument("--clip", required=True, help="the CLIP the authors trained on (OpenAI's ViT-B-16)")
    p.add_argument("--stage1", required=True, help="the authors' stage-1 file (model_epoch_N.pth)")
    p.add_argument("--stage2", help="the authors' stage-2 file")
    p.add_argument("--dataset", required=True, choices=["rafdb", "affectnet7", "affectnet8"],
                   help="the dataset the files were trained on (their class words differ)")
    p.add_argument("--out", required=True, help="folder for stage1.safetensors (and stage2.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier import in --out")
    p.set_defaults(verb_parser=p, handler=commands.run_import_official)

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
    p.add_argument("--max-connections-per-client", type=arg(Range(0, 100_000, integer=True)), metavar="N",
                   help="open connections one client address may hold (default: an eighth of --max-connections, at "
                        "least 4; 0: no share; behind a reverse proxy every client has the proxy's address)")
    p.add_argument("--max-faces", type=arg(Range(1, 10_000, integer=True)), default=64,
                   help="faces classified per image, the largest first (default 64)")
    p.add_argument("--batch-window", type=arg(Range(0, 1)), default=0.005, metavar="S",
                   help="seconds a request waits for others to share its forward pass (default 0.005)")
    p.add_argument("--header-timeout", type=arg(Range(0, 3600, lo_open=True)), default=10.0, metavar="S",
                   help="seconds a connection has to send its request headers (default 10)")
    p.add_argument("--keep-alive", type=arg(Range(0, 3600, lo_open=True)), default=5.0, metavar="S",
                   help="seconds an idle connection stays open after a response (default 5)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _add_precision(p)
    _add_min_face(p)
    _add_pixel_limit(p)
    _add_threads(p)
    _add_classes(p)
    p.set_defaults(verb_parser=p, handler=commands.run_serve, precision="auto")

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
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto: fp32, the same computation on every CPU (the demo's small "
                        "models gain little from bf16)")
    _add_threads(p)
    p.set_defaults(verb_parser=p, handler=commands.run_demo, precision="auto")

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
    p.set_defaults(verb_parser=p, handler=commands.run_make_demo_data)

    p = verbs.add_parser("doctor", help="report versions and devices; round-trip a tiny CLIP through every format")
    p.add_argument("--arch", default="tiny-vit", help="architecture to round-trip (default: tiny-vit)")
    p.set_defaults(verb_parser=p, handler=commands.run_doctor)
    return parser
