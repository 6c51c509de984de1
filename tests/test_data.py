"""Dataset layouts, class orders, validation errors and samplers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ceprompt.core.errors import DataError
from ceprompt.data.datasets import LAYOUTS, load_splits
from ceprompt.data.samplers import ShardSampler, TrainSampler

from helpers import write_folder_dataset, write_three_file_dataset


@pytest.mark.parametrize("dataset", list(LAYOUTS))
def test_three_file_layouts(tmp_path: Path, dataset: str) -> None:
    root = write_three_file_dataset(tmp_path / dataset, dataset, n_train=2, n_test=1)
    splits = load_splits(dataset, root)
    n = len(LAYOUTS[dataset].class_names)
    assert splits.class_names == list(LAYOUTS[dataset].class_names)
    assert len(splits.train) == 2 * n and len(splits.test) == n
    assert sorted({s.label for s in splits.test}) == list(range(n))
    assert all(Path(s.path).is_file() for s in splits.train + splits.test)


def test_class_orders_follow_design() -> None:
    assert LAYOUTS["rafdb"].class_names == ("surprise", "fear", "disgust", "happy", "sad", "anger", "neutral")
    assert LAYOUTS["affectnet7"].class_names == ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger")
    assert LAYOUTS["affectnet8"].class_names[-1] == "contempt" and len(LAYOUTS["affectnet8"].class_names) == 8
    assert LAYOUTS["ferplus"].class_names == ("neutral", "happy", "surprise", "sad", "anger", "disgust", "fear",
                                              "contempt")
    # RAF-DB labels are 1-based in the files
    assert LAYOUTS["rafdb"].label_offset == 1


def test_rafdb_falls_back_to_aligned(tmp_path: Path) -> None:
    root = write_three_file_dataset(tmp_path / "raf", "rafdb", 1, 1)
    (root / "Image" / "aligned_224").rename(root / "Image" / "aligned")
    splits = load_splits("rafdb", root)
    assert "/Image/aligned/" in splits.train[0].path


def test_folder_dataset(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "f", ["calm", "angry", "joyful"], 2, 1)
    splits = load_splits("folder", root)
    assert splits.class_names == ["angry", "calm", "joyful"]
    ordered = load_splits("folder", root, classes=["joyful", "calm", "angry"])
    assert ordered.class_names == ["joyful", "calm", "angry"]
    assert {Path(s.path).parent.name for s in ordered.test if s.label == 0} == {"joyful"}


def test_bad_dataset_lists_every_problem(tmp_path: Path) -> None:
    root = write_three_file_dataset(tmp_path / "raf", "rafdb", 2, 1)
    info = root / "EmoLabel"
    labels = (info / "image_class_labels.txt").read_text().splitlines()
    labels[0] = "1 9"  # outside 1..7
    labels.append("2 3")  # duplicate id
    (info / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    with open(info / "images.txt", "a") as fh:
        fh.write("999 nowhere.jpg\n")  # id only in images.txt
    (root / "Image" / "aligned_224" / "train_00003_aligned.jpg").unlink()  # missing image
    (root / "Image" / "aligned_224" / "train_00004_aligned.jpg").write_bytes(b"not a jpeg")  # unreadable
    with pytest.raises(DataError) as err:
        load_splits("rafdb", root)
    msg = str(err.value)
    assert "image_class_labels.txt:22: duplicate id '2' (first on line 2)" in msg
    assert "label 9, outside 1..7" in msg
    assert "images.txt:22: id '999' is missing from image_class_labels.txt and train_test_split.txt" in msg
    # index problems are reported first, image problems once the index is sound
    labels = labels[:-1]
    labels[0] = "1 1"
    (info / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (info / "images.txt").write_text("\n".join((info / "images.txt").read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DataError) as err:
        load_splits("rafdb", root)
    msg = str(err.value)
    assert "2 problem(s)" in msg
    assert "train_00003_aligned.jpg: missing image file" in msg
    assert "train_00004_aligned.jpg: unreadable image" in msg
    splits = load_splits("rafdb", root, skip_bad_images=True)
    assert len(splits.skipped) == 2 and len(splits.train) + len(splits.test) == 21 - 2


def test_missing_index_file(tmp_path: Path) -> None:
    root = write_three_file_dataset(tmp_path / "aff", "affectnet8", 1, 1)
    (root / "affectnet_info" / "train_test_split_8cls.txt").unlink()
    with pytest.raises(DataError, match=r"affectnet_info/train_test_split_8cls.txt: missing file"):
        load_splits("affectnet8", root)


def test_train_sampler_shards_and_balances() -> None:
    labels = [0] * 90 + [1] * 10
    draws = [list(TrainSampler(labels, world=2, rank=r, seed=5)) for r in range(2)]
    shards = [[i for i, _ in d] for d in draws]
    assert sorted(shards[0] + shards[1]) == list(range(100))  # a permutation split in two
    assert len({seed for d in draws for _, seed in d}) == 100  # every draw its own augmentation seed
    assert list(TrainSampler(labels, world=2, rank=0, seed=5)) == draws[0]  # reproducible per (seed, epoch)
    s = TrainSampler(labels, world=2, rank=0, seed=5)
    s.set_epoch(1)
    assert [i for i, _ in s] != shards[0]
    balanced = TrainSampler(labels * 20, balanced=True, seed=0)
    counts = Counter((labels * 20)[i] for i, _ in balanced)
    assert 0.4 < counts[1] / len(balanced) < 0.6  # the 10% class drawn about half the time
    assert sorted(i for r in range(3) for i in ShardSampler(10, 3, r)) == list(range(10))


def test_augmentation_follows_the_draw_not_the_loader_process(tmp_path: Path) -> None:
    """The same draws give the same augmented batches with 0 or 2 loader processes, kept for the run or not."""
    import torch
    from torch.utils.data import DataLoader

    from ceprompt.data.datasets import FERDataset
    from ceprompt.data.transforms import preprocess_for, train_augment

    root = write_three_file_dataset(tmp_path / "aff", "affectnet7", 2, 1, size=32)
    pre = preprocess_for(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    data = FERDataset(load_splits("affectnet7", root).train, pre.resize(), train_augment("affectnet", pre))
    sampler = TrainSampler(data.labels, seed=3)

    def epochs(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(data, batch_size=5, sampler=sampler, num_workers=workers,
                            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(workers))
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out += [batch["image"] for batch in loader]
        return out
    alone, helped = epochs(0), epochs(2)
    assert all(torch.equal(a, b) for a, b in zip(alone, helped)) and len(alone) == 6
    assert not torch.equal(alone[0], alone[3])  # another epoch, other augmentations
