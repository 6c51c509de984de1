"""``ceprompt prepare`` on small files written in each dataset's official format, malformed rows included."""

from __future__ import annotations

from pathlib import Path

import pytest

from ceprompt.cli import main
from ceprompt.core.errors import DataError
from ceprompt.data.datasets import load_splits
from ceprompt.data.prepare import prepare

from helpers import class_image


def write_rafdb_official(src: Path) -> None:
    (src / "EmoLabel").mkdir(parents=True)
    aligned = src / "Image" / "aligned"
    aligned.mkdir(parents=True)
    lines = []
    for i in range(14):
        split = "train" if i < 10 else "test"
        name = f"{split}_{i + 1:05d}.jpg"
        class_image(i % 7, 7, seed=i).save(aligned / name.replace(".jpg", "_aligned.jpg"))
        lines.append(f"{name} {i % 7 + 1}")
    lines += ["train_00099.jpg 9", "just_one_field", "train_00001.jpg 2", "valid_00001.jpg 3"]
    (src / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")


def test_rafdb_reports_bad_rows_by_line_then_skips_them(tmp_path: Path, capsys) -> None:
    src, dst = tmp_path / "RAF-DB", tmp_path / "prepared"
    write_rafdb_official(src)
    with pytest.raises(DataError) as err:
        prepare("rafdb", src, dst)
    msg = str(err.value)
    for expected in ("list_patition_label.txt:15: label '9' is not 1..7",
                     "list_patition_label.txt:16: expected 'name label'",
                     "list_patition_label.txt:17: train_00001.jpg already listed on line 1",
                     "list_patition_label.txt:18: name 'valid_00001.jpg' does not start with train_ or test_"):
        assert expected in msg
    assert not (dst / "EmoLabel").exists()  # nothing written when the input is refused
    assert main(["prepare", "rafdb", str(src), str(dst), "--skip-bad-rows", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "10 training and 4 test images" in out and "skipped 4 malformed row(s)" in out
    splits = load_splits("rafdb", dst)
    assert len(splits.train) == 10 and len(splits.test) == 4
    assert [s.label for s in splits.train[:3]] == [0, 1, 2]  # file labels 1..7 -> class indices 0..6
    # a second run does not silently replace the index
    assert main(["prepare", "rafdb", str(src), str(dst), "--skip-bad-rows"]) == 1


AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,"
                    "valence,arousal")


def write_affectnet_official(src: Path) -> None:
    images = src / "Manually_Annotated_Images"
    rows = {"training.csv": [], "validation.csv": []}
    for i, expression in enumerate([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 1, 6]):
        rel = f"{i % 3}/img{i}.jpg"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        class_image(expression % 8, 8, seed=i, size=40).save(images / rel)
        csv_name = "training.csv" if i < 9 else "validation.csv"
        rows[csv_name].append(f'{rel},2,2,36,36,"1;2;3",{expression},0.1,0.2')
    rows["training.csv"].append("9/x.jpg,a,2,3,4,\"\",1,0,0")  # box not a number
    rows["validation.csv"].append("only,three,fields")
    for name, lines in rows.items():
        (src / name).write_text(AFFECTNET_HEADER + "\n" + "\n".join(lines) + "\n")


def test_affectnet_seven_and_eight_classes(tmp_path: Path) -> None:
    src, dst = tmp_path / "AffectNet", tmp_path / "an"
    write_affectnet_official(src)
    with pytest.raises(DataError, match=r"training.csv:11: expression or face box is not a number"):
        prepare("affectnet", src, dst)
    summary = prepare("affectnet", src, dst, skip_bad_rows=True, progress=False)
    assert summary["left_out"] == {"none": 1, "no face": 1}
    assert "validation.csv:5: 3 fields, expected 9" in summary["skipped_rows"][1]
    seven, eight = load_splits("affectnet7", dst), load_splits("affectnet8", dst)
    assert (len(seven.train), len(seven.test)) == (7, 2)  # contempt (7) only in the 8-class index
    assert (len(eight.train), len(eight.test)) == (8, 2)
    assert sorted(s.label for s in eight.train) == [0, 1, 2, 3, 4, 5, 6, 7]


FERPLUS_HEADER = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF"


def test_ferplus_majority_vote(tmp_path: Path) -> None:
    src, dst = tmp_path / "FERPlus", tmp_path / "fp"
    rows = [
        ("Training", "fer0000000.png", [10, 0, 0, 0, 0, 0, 0, 0, 0, 0]),  # neutral
        ("Training", "fer0000001.png", [0, 6, 4, 0, 0, 0, 0, 0, 0, 0]),  # happiness (6 of 10)
        ("Training", "fer0000002.png", [0, 5, 5, 0, 0, 0, 0, 0, 0, 0]),  # tie: no majority
        ("Training", "fer0000003.png", [0, 0, 0, 0, 0, 0, 0, 0, 3, 7]),  # not a face
        ("Training", "", [10, 0, 0, 0, 0, 0, 0, 0, 0, 0]),  # removed by FERPlus
        ("PublicTest", "fer0000005.png", [0, 0, 0, 0, 0, 0, 0, 9, 1, 0]),  # contempt, validation
        ("PrivateTest", "fer0000006.png", [0, 0, 0, 0, 0, 0, 8, 0, 2, 0]),  # fear
    ]
    lines = [FERPLUS_HEADER]
    for usage, name, votes in rows:
        lines.append(",".join([usage, name, *map(str, votes)]))
        if name:
            folder = src / {"Training": "FER2013Train", "PublicTest": "FER2013Valid", "PrivateTest": "FER2013Test"}[usage]
            folder.mkdir(parents=True, exist_ok=True)
            class_image(0, 8, seed=len(lines), size=48).convert("L").save(folder / name)
    lines.append("Training,fer0000009.png,1,2,x,0,0,0,0,0,0,0")
    (src / "fer2013new.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"fer2013new.csv:9: vote counts are not integers"):
        prepare("ferplus", src, dst)
    summary = prepare("ferplus", src, dst, skip_bad_rows=True, valid_as="test", progress=False)
    assert summary["left_out"] == {"no majority": 1, "unknown / not a face": 1, "no image (removed by FERPlus)": 1}
    splits = load_splits("ferplus", dst)
    assert sorted(s.label for s in splits.train) == [0, 1]  # neutral, happiness
    assert sorted(s.label for s in splits.test) == [6, 7]  # fear, contempt (PublicTest as test)


def test_rafdb_align_recuts_faces(tmp_path: Path) -> None:
    pytest.importorskip("facenet_pytorch")
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    src = tmp_path / "RAF-DB"
    (src / "EmoLabel").mkdir(parents=True)
    (src / "Image" / "original").mkdir(parents=True)
    Image.fromarray(skimage_data.astronaut()).save(src / "Image" / "original" / "train_00001.jpg")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(src / "Image" / "original" / "test_00001.jpg")
    (src / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 4\ntest_00001.jpg 7\n")
    summary = prepare("rafdb", src, tmp_path / "aligned", align=True, progress=False)
    crop = Image.open(tmp_path / "aligned" / "Image" / "aligned_224" / "train_00001_aligned.jpg")
    assert crop.size == (224, 224)
    assert any("no face detected" in n for n in summary["alignment_notes"])  # the grey image
    assert len(load_splits("rafdb", tmp_path / "aligned").train) == 1
