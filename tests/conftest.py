"""The longest test files start first: with two workers taking whole files (``--dist loadfile``), a long file
collected last would run alone at the end while the other worker sits idle (about a minute of the suite)."""

from __future__ import annotations

LONGEST_FIRST = ("test_demo.py", "test_distributed.py", "test_speed.py", "test_hub.py", "test_official.py",
                 "test_serve.py")


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items[:] = sorted(items, key=rank)  # stable: each file's tests keep their order
