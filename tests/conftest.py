"""The longest test files start first. Two workers take whole files (``--dist loadfile``); xdist would order the
files by how many tests they hold (``--no-loadscope-reorder`` keeps this order instead), which started the two
longest files, each a handful of tests, last: one worker then ran them alone at the end while the other sat idle."""

from __future__ import annotations

LONGEST_FIRST = ("test_demo.py", "test_speed.py", "test_distributed.py", "test_hub.py", "test_serve.py",
                 "test_official.py", "test_video.py", "test_train.py")


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items[:] = sorted(items, key=rank)  # stable: each file's tests keep their order
