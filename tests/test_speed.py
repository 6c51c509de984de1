"""Speed without surprises (issue 19): what ``precision: auto`` picks, bf16 agreeing with fp32, the block pass
matching open_clip's, detection on a downscaled copy finding the same faces, and the relative minimum face."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ceprompt
import ceprompt.engine.threads as threads
from ceprompt.cli import DEFAULT_MIN_FACE, main
from ceprompt.core import runtime
from ceprompt.core.errors import ConfigError
from ceprompt.data.faces import DEFAULT_MIN_FACE as MIN_FACE_OBJECT
from ceprompt.data.faces import FaceDetector, MinFace
from ceprompt.model.clip import build_clip
from ceprompt.model.towers import block_forward, run_blocks
from ceprompt.weights.build import load_trained

from helpers import precision_agreement, train_tiny_runs

CPU = torch.device("cpu")


def fake_cpu(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, True, "bf16"), (True, False, "bf16"),
                                                        (False, True, "bf16"), (False, False, "fp32")])
def test_auto_precision_follows_the_cpus_native_bf16(monkeypatch, amx, avx512_bf16, expected) -> None:
    fake_cpu(monkeypatch, amx, avx512_bf16)
    chosen, why = runtime.auto_precision(CPU)
    assert chosen == expected and runtime.resolve_precision("auto", CPU) == expected
    assert ("AMX" in why) == amx and ("AVX512-BF16" in why) == avx512_bf16 if expected == "bf16" else "emulated" in why
    for forced in ("fp32", "bf16", "fp16"):  # --precision still forces a choice
        assert runtime.resolve_precision(forced, CPU) == forced
    with pytest.raises(ConfigError, match="precision 'int8'"):
        runtime.resolve_precision("int8", CPU)


def test_auto_precision_without_torchs_probes_and_on_gpus(monkeypatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert runtime.auto_precision(CPU)[0] == "fp32"  # an older torch: no claim of native bf16
    # GPUs: the device's compute capability decides (tests/test_distributed.py), not is_bf16_supported
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert runtime.auto_precision(torch.device("cuda", 0))[0] == "fp16"


def test_the_gpu_preset_runs_every_case_with_tiny_shapes_on_the_cpu(tmp_path: Path) -> None:
    """``speed.py --gpu --smoke``: the preset a first GPU run will use, end to end before any GPU exists; the
    results file holds every case (none failed) and the trainer ran under torchrun with 2 processes."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "speed.py"), "--gpu", "--smoke", "--out",
                           str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]["tiny-vit"]
    cases = ["bare tower img/s", "stage-1 step img/s", "stage-2 step img/s", "stage-1 eval img/s",
             "stage-2 eval img/s", "stage-1 predict img/s", "stage-2 predict img/s", "stage-2 serve img/s (batch 1)",
             "web API, concurrent clients",
             "12 MP photo, one face", "video frames/s (640x360, one face)", "trainer epoch-2 img/s",
             "step img/s (peak GiB), run.compile"]
    assert all(c in results for c in cases), set(cases) - set(results)
    assert not [c for c, v in results.items() if isinstance(v, dict) and ("failed" in v or "skipped" in v)]
    assert results["trainer epoch-2 img/s"]["stage-1 bf16 processes"] == 2
    assert len(results["step img/s (peak GiB), run.compile"]) == 4 and results["ratios"]
    assert {"fp32 batch 1", "bf16 batch 1"} <= set(results["stage-2 predict img/s"])  # a face alone, beside a batch
    assert results["web API, concurrent clients"]["req/s, 8 client(s)"] > 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Trained well past chance (6 epochs on 70 images), so that labels are not ties that any rounding flips, and
    with one thread, so that the weights are the same on a busy machine (torch splits some sums by thread)."""
    before = torch.get_num_threads()
    try:
        return train_tiny_runs(tmp_path_factory.mktemp("speed"), n_train=10, epochs=6, threads=1)
    finally:
        torch.set_num_threads(before)


def test_every_entry_point_uses_auto(runs, monkeypatch, capsys) -> None:
    fake_cpu(monkeypatch, False, True)
    assert ceprompt.load(runs["s2"], device="cpu").precision == "bf16"
    assert ceprompt.load(runs["s2"], device="cpu", precision="fp32").precision == "fp32"
    fake_cpu(monkeypatch, False, False)
    assert ceprompt.load(runs["s2"], device="cpu").precision == "fp32"
    from ceprompt.verbs.doctor import _devices

    fake_cpu(monkeypatch, True, False)
    assert dict(_devices())["cpu"] == "--precision auto = bf16: the CPU multiplies bf16 natively (AMX)"


def test_bf16_agrees_with_fp32_on_a_trained_tiny_model(runs) -> None:
    from helpers import class_image

    images = [class_image(label, 7, seed=1000 + i, size=64) for i in range(50) for label in range(7)]
    for stage in ("s1", "s2"):
        same, worst = precision_agreement(runs[stage], images)
        assert same >= 0.99 and worst <= 0.02, (stage, same, worst)


def test_bf16_recognizer_stores_block_weights_with_autocasts_results(runs) -> None:
    """Weights kept in bf16 save autocast's per-call conversion and change no number: the same probabilities as
    autocast over the fp32 weights, which the training path keeps."""
    from helpers import class_image

    images = [class_image(label, 7, seed=2000 + label, size=64) for label in range(7)]
    for stage in ("s1", "s2"):
        rec = ceprompt.load(runs[stage], device="cpu", precision="bf16")
        blocks = rec.model.clip.visual.transformer.resblocks
        assert blocks[0].attn.in_proj_weight.dtype == blocks[-1].mlp.c_fc.weight.dtype == torch.bfloat16
        assert blocks[0].ln_1.weight.dtype == rec.model.clip.visual.proj.dtype == torch.float32
        fp32_weights = load_trained(runs[stage]).model.eval()
        batch = rec.preprocess.batch_tensor([rec._resize(image) for image in images])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            want = fp32_weights(batch, text_features=rec.text_features).logits.float()
            got = rec.model(batch, text_features=rec.text_features).logits.float()
        assert torch.equal(got, want), stage
    assert ceprompt.load(runs["s2"], device="cpu", precision="fp32").model.clip.visual.proj.dtype == torch.float32


def test_block_pass_equals_open_clips_block(monkeypatch) -> None:
    clip = build_clip("tiny-vit", seed=0)
    x = torch.randn(3, 17, clip.visual.conv1.weight.shape[0])
    blocks = clip.visual.transformer.resblocks
    with torch.no_grad():
        want = x
        for block in blocks:
            want = block(want)
        assert torch.allclose(run_blocks(blocks, x), want, atol=1e-5)
        text = clip.transformer.resblocks[0]
        t = torch.randn(2, 9, text.attn.embed_dim)
        mask = clip.attn_mask[:9, :9]
        assert torch.allclose(block_forward(text, t, mask), text(t, attn_mask=mask), atol=1e-5)
    # gradients flow to the input and to every weight of a trainable block, as through open_clip's own call
    block = blocks[-1]
    x.requires_grad_(True)
    block_forward(block, x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


def test_threads_follow_a_busy_machine_in_predict(runs, monkeypatch, tmp_path) -> None:
    """The bf16 default does not override the load-aware thread count (a neighbour on one of two cores)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_last_choice", None)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    ticks = itertools.count()  # each sample 200 ticks later, all busy, none ours: the neighbour's core stays busy
    monkeypatch.setattr(threads.CpuSample, "now", classmethod(lambda cls: threads.CpuSample(
        200 * (t := next(ticks)), 200 * t, 0.0, float(t))))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    image = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (128, 100, 90)).save(image)
    before = torch.get_num_threads()
    try:
        assert main(["predict", str(runs["s2"]), str(image), "--detect", "none", "-o", str(tmp_path / "p.csv"),
                     "--device", "cpu"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- faces in large photos ---

def test_min_face_takes_pixels_a_share_of_the_shorter_side_or_both() -> None:
    assert MinFace.parse(DEFAULT_MIN_FACE) == MIN_FACE_OBJECT == MinFace(20, 0.02)  # the CLI's default is the API's
    assert MinFace.parse("30") == MinFace.parse("30px") == MinFace.parse(30) == MinFace(30, 0.0)
    assert MinFace.parse("2%") == MinFace(12, 0.02) and MinFace.parse("2%, 40px") == MinFace(40, 0.02)
    assert MIN_FACE_OBJECT.pixels_for(4032, 3024) == pytest.approx(60.48)  # 2% of a 12 MP photo's shorter side
    assert MIN_FACE_OBJECT.pixels_for(640, 480) == 20  # small images are searched as before
    assert MinFace.parse("2%").pixels_for(300, 200) == 12  # never under MTCNN's smallest window
    for bad in ("0", "11", "-5", "0%", "101%", "2%,3%", "abc", "", "nan", "12.5", "20px,30px"):
        with pytest.raises(ConfigError, match="--min-face"):
            MinFace.parse(bad)


def phone_photo(face_scale: float, positions: list[tuple[int, int]], size=(4032, 3024)) -> Image.Image:
    """A 12 MP photo: the astronaut picture scaled by ``face_scale`` and pasted at ``positions``."""
    skimage_data = pytest.importorskip("skimage.data")
    canvas = Image.new("RGB", size, (90, 110, 100))
    astronaut = Image.fromarray(skimage_data.astronaut())
    side = round(512 * face_scale)
    for x, y in positions:
        canvas.paste(astronaut.resize((side, side), Image.BICUBIC), (x, y))
    return canvas


def full_resolution_faces(image: Image.Image, min_face: int) -> list[tuple[float, ...]]:
    """What ceprompt 0.2 did: MTCNN on the full image."""
    from facenet_pytorch import MTCNN

    boxes, probs = MTCNN(keep_all=True, min_face_size=min_face, post_process=False).detect(image)
    return [tuple(b) for b, p in zip(boxes, probs) if p >= 0.9]


@pytest.mark.parametrize("scale, positions, mean_error, max_error", [
    (4.0, [(1000, 500)], 0.03, 0.03),  # one face of 360 x 450 px
    (1.5, [(1500, 1000)], 0.03, 0.03),  # one face of 135 px
    (0.75, [(100 + 480 * i, 1500) for i in range(8)], 0.04, 0.08),  # eight faces of 65 px, just above the minimum
])
def test_large_photos_find_the_same_faces_on_a_downscaled_copy(scale, positions, mean_error, max_error) -> None:
    """The same faces as MTCNN on the full image, the box corners within a share of the face's side.

    The bounds are MTCNN's own noise: shifting these photos by 2-8 pixels moves its full-image boxes by up to
    1.6% of a 135-450 px face and 5-6% of a 65-90 px one (1% and 2.5% on average)."""
    pytest.importorskip("facenet_pytorch")
    photo = phone_photo(scale, positions)
    want = full_resolution_faces(photo, min_face=60)
    got = FaceDetector("cpu").detect(photo)
    assert len(got) == len(want) == len(positions)
    errors = []
    for box in want:
        side = max(box[2] - box[0], box[3] - box[1])
        nearest = min(got, key=lambda f: np.abs(np.subtract(f.box, box)).max())
        errors.append(np.abs(np.subtract(nearest.box, box)).max() / side)
        assert len(nearest.landmarks) == 5
    assert np.mean(errors) <= mean_error and max(errors) <= max_error, errors


def test_min_face_20px_still_searches_everything() -> None:
    pytest.importorskip("facenet_pytorch")
    photo = phone_photo(0.6, [(100 + 400 * i, 1500) for i in range(9)])  # nine faces of 53 px, under 2%
    assert len(FaceDetector("cpu").detect(photo)) < 9  # the default leaves faces under 2% of 3024 px out
    assert len(FaceDetector("cpu", min_face="20px").detect(photo)) == 9


def rotate_whole_image_then_crop(image: Image.Image, box, landmarks, size: int, expand: float = 1.3) -> Image.Image:
    """The crop policy done the direct way, as ceprompt 0.2 did: rotate the whole image about the eyes' midpoint,
    then cut the square around the rotated box centre."""
    import math

    (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
    angle = math.degrees(math.atan2(ry - ly, rx - lx))
    ex, ey = (lx + rx) / 2, (ly + ry) / 2
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    a, dx, dy = math.radians(angle), cx - ex, cy - ey
    cx, cy = ex + dx * math.cos(a) + dy * math.sin(a), ey - dx * math.sin(a) + dy * math.cos(a)
    half = max(box[2] - box[0], box[3] - box[1]) * expand / 2
    rotated = image.rotate(angle, resample=Image.BICUBIC, center=(ex, ey))
    crop = rotated.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
    return crop.resize((size, size), Image.BICUBIC)


def test_aligning_rotates_only_the_faces_neighbourhood_with_the_same_pixels() -> None:
    from ceprompt.data.faces import align_face

    skimage_data = pytest.importorskip("skimage.data")
    image = Image.fromarray(skimage_data.astronaut()).resize((900, 700))
    rng = np.random.default_rng(0)
    for _ in range(60):  # boxes anywhere (also across the border), eyes at any angle (also upside down)
        x0, y0, w = rng.uniform(-150, 850), rng.uniform(-150, 650), rng.uniform(15, 600)
        box = (x0, y0, x0 + w, y0 + w * rng.uniform(0.8, 1.3))
        eyes = [tuple(rng.uniform((x0, y0), (x0 + w, y0 + w))) for _ in range(2)]
        want = rotate_whole_image_then_crop(image, box, eyes, 48)
        assert np.array_equal(np.asarray(align_face(image, box, eyes, 48)), np.asarray(want))
