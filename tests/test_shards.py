"""Work split across processes (querytune.shards): shares, gathering in order, chunked encoding to a file with resume,
and 2 real gloo processes ending with what one process computes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from querytune.shards import encode_to_file, sharded_map, share

TEXTS = [f"product {i} " + "word " * (i % 7) for i in range(103)]


def fake_encode(texts: list[str]) -> np.ndarray:
    """A deterministic 'embedding': (len, 4) from the text itself."""
    return np.array([[len(t), sum(map(ord, t)) % 97, t.count("word"), int(t.split()[1]) if len(t.split()) > 1 else 0]
                     for t in texts], dtype=np.float32)  # fmt: skip


@pytest.mark.parametrize("n,size", [(0, 2), (1, 2), (7, 3), (103, 2), (5, 8)])
def test_shares_cover_every_item_once_in_order(n, size):
    parts = [list(range(n))[share(n, r, size)] for r in range(size)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_encode_to_file_equals_encoding_at_once_and_is_memory_mapped(tmp_path):
    emb = encode_to_file(fake_encode, TEXTS, tmp_path / "cat.npy", chunk_rows=10)
    assert isinstance(emb, np.memmap) and emb.shape == (103, 4)
    np.testing.assert_array_equal(np.asarray(emb), fake_encode(TEXTS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.npy"], "no partial file or log left behind"
    np.testing.assert_array_equal(np.load(tmp_path / "cat.npy"), fake_encode(TEXTS))  # a plain .npy file


def test_a_killed_encoding_resumes_at_the_next_chunk_and_never_looks_finished(tmp_path):
    calls: list[int] = []

    def dies_at_chunk_4(texts):
        if len(calls) == 4:  # the width probe, then chunks 0-2: killed while encoding chunk 3
            raise KeyboardInterrupt
        calls.append(len(texts))
        return fake_encode(texts)

    with pytest.raises(KeyboardInterrupt):
        encode_to_file(dies_at_chunk_4, TEXTS, tmp_path / "cat.npy", chunk_rows=10)
    assert not (tmp_path / "cat.npy").exists(), "a half-written matrix must not take the finished name"
    assert (tmp_path / "cat.partial-0of1.done").read_text().split() == ["0", "1", "2"]

    again: list[int] = []

    def counting(texts):
        again.append(len(texts))
        return fake_encode(texts)

    emb = encode_to_file(counting, TEXTS, tmp_path / "cat.npy", chunk_rows=10)
    assert again == [1] + [10] * 7 + [3], "the probe, then only chunks 3-10"
    np.testing.assert_array_equal(np.asarray(emb), fake_encode(TEXTS))
    assert not list(tmp_path.glob("*.partial*")) and not list(tmp_path.glob("*.done"))
    assert encode_to_file(lambda t: pytest.fail("cached: nothing to encode"), TEXTS, tmp_path / "cat.npy").shape == (
        103, 4)  # fmt: skip


def test_bad_chunk_rows_and_a_wrong_width_are_refused(tmp_path):
    with pytest.raises(ValueError, match="chunk_rows"):
        encode_to_file(fake_encode, TEXTS, tmp_path / "a.npy", chunk_rows=0)
    widths = iter([4, 5])
    with pytest.raises(ValueError, match="expected"):
        encode_to_file(lambda t: np.zeros((len(t), next(widths, 5)), np.float32), TEXTS, tmp_path / "b.npy", 50)
    assert not (tmp_path / "b.npy").exists()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    try:
        seen: list[str] = []

        def encode(texts):
            seen.extend(texts)
            return fake_encode(texts)

        emb = encode_to_file(encode, TEXTS, Path(folder) / f"rank{rank}" / "cat.npy", chunk_rows=10)
        squares = sharded_map(lambda part: [(x, x * x) for x in part], list(range(23)))
        np.save(Path(folder) / f"out{rank}.npy", np.asarray(emb))
        (Path(folder) / f"seen{rank}.txt").write_text("\n".join(seen[1:]))  # after the width probe
        (Path(folder) / f"squares{rank}.txt").write_text(repr(squares))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_share_the_encoding_and_both_end_with_every_row(tmp_path):
    mp.spawn(_worker, args=(2, _port(), str(tmp_path)), nprocs=2, join=True)
    expected = fake_encode(TEXTS)
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"out{rank}.npy"), expected)
        assert (tmp_path / f"rank{rank}" / "cat.npy").is_file()
        assert (tmp_path / f"squares{rank}.txt").read_text() == repr([(x, x * x) for x in range(23)])
    seen = [(tmp_path / f"seen{rank}.txt").read_text().split("\n") for rank in (0, 1)]
    assert sorted(seen[0] + seen[1]) == sorted(TEXTS), "every row encoded exactly once across the two ranks"
    assert len(seen[0]) == 53 and len(seen[1]) == 50, "chunks alternate: 6 chunks (one of 3 rows) and 5"
