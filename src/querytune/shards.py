"""Work split across the processes of a job (`accelerate launch`, DDP), and embeddings encoded to a file in chunks.

Under N processes, `sharded_map` gives each rank a contiguous share of the items and gathers the results in order,
so every rank ends with the whole answer and the work per rank falls with N. `encode_to_file` writes a large
embedding matrix chunk by chunk to a `.npy` file (memory stays at one chunk, whatever the number of rows), skips
the chunks a killed job already wrote, and under N processes encodes chunk c on rank c mod N and broadcasts it, so
each rank ends with the complete file (each machine its own copy: no shared filesystem is needed). One process
without torch.distributed is the same code with N = 1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def world() -> tuple[int, int]:
    """(rank, number of processes) of the running job; (0, 1) outside torch.distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(n: int, rank: int, size: int) -> slice:
    """Rank `rank`'s contiguous share of n items: sizes differ by at most one, earlier ranks take the extra."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def sharded_map(fn: Callable[[list[T]], list[R]], items: Sequence[T]) -> list[R]:
    """fn over this rank's share of `items`, gathered from every rank in order: fn(items) split N ways.

    `fn` takes a list and returns one result per item. Every rank must call this with the same items.
    """
    rank, size = world()
    if size == 1:
        return list(fn(list(items)))
    mine = list(items[share(len(items), rank, size)])
    local = list(fn(mine)) if mine else []
    if len(local) != len(mine):
        raise RuntimeError(f"sharded_map: {len(mine)} items gave {len(local)} results on rank {rank}")
    gathered: list[list[R] | None] = [None] * size
    torch.distributed.all_gather_object(gathered, local)
    return [result for part in gathered for result in part or []]


def _collective_device() -> torch.device:
    """The device collectives run on: the current GPU under NCCL, the CPU under gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _npy_offset(path: Path) -> int:
    """Where the rows of a .npy file start (after its header)."""
    return int(np.load(path, mmap_mode="r").offset)


def _read_rows(fh, offset: int, start: int, stop: int, width: int) -> np.ndarray:
    nbytes = (stop - start) * width * 4
    data = os.pread(fh.fileno(), nbytes, offset + start * width * 4)
    if len(data) != nbytes:
        raise OSError(f"{fh.name}: short read of rows {start}-{stop}")
    return np.frombuffer(data, dtype=np.float32).reshape(stop - start, width)


def _write_rows(fh, offset: int, start: int, rows: np.ndarray) -> None:
    data = np.ascontiguousarray(rows, dtype=np.float32).tobytes()
    written = os.pwrite(fh.fileno(), data, offset + start * rows.shape[1] * 4)
    if written != len(data):
        raise OSError(f"{fh.name}: short write of rows from {start}")


def _everyone(flag: bool, size: int) -> bool:
    """Whether `flag` holds on every rank (so that all ranks take the same branch into the collectives)."""
    if size == 1:
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _width(encode: Callable[[list[str]], np.ndarray], texts: Sequence[str], finished: Path | None) -> int:
    """The embedding width: from a finished file, else from encoding the first text (the same on every rank)."""
    if finished is not None:
        return int(np.load(finished, mmap_mode="r").shape[1])
    return int(np.asarray(encode(list(texts[:1]))).shape[1]) if len(texts) else 0


def encode_to_file(encode: Callable[[list[str]], np.ndarray], texts: Sequence[str], path: Path,
                   chunk_rows: int = 65536) -> np.ndarray:  # fmt: skip
    """The float32 embeddings of `texts` in the `.npy` file `path`, returned memory-mapped (read-only).

    `encode` maps a list of texts to their (len, width) embeddings. Rows are encoded `chunk_rows` at a time and
    written straight to `<path stem>.partial-<rank>of<N>.npy`, each finished chunk logged in `... .done` after it is
    on disk, so a killed job resumes at the first chunk it had not finished; the file becomes `path` (atomically)
    only when every row is in it, so a half-written matrix never looks finished.
    """
    path = Path(path)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    rank, size = world()
    have = path.is_file()
    if _everyone(have, size):
        return np.load(path, mmap_mode="r")
    n = len(texts)
    chunks = [(start, min(start + chunk_rows, n)) for start in range(0, n, chunk_rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path if have else path.with_name(f"{path.stem}.partial-{rank}of{size}.npy")
    log = partial.with_suffix(".done")
    width = _width(encode, texts, path if have else None)
    if not partial.is_file():
        log.unlink(missing_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, width))  # a sparse file
    done = set(range(len(chunks))) if have else {int(x) for x in log.read_text().split()} if log.is_file() else set()
    offset = _npy_offset(partial)
    mine = [c for c in range(len(chunks)) if c % size == rank]
    todo = [c for c in mine if c not in done]
    if done and todo:
        logger.info("%s: resuming, %d of this rank's %d chunks already written", path.name, len(mine) - len(todo),
                    len(mine))  # fmt: skip
    logger.info("encoding %d of %d rows in %d chunks (rank %d of %d)", sum(chunks[c][1] - chunks[c][0] for c in todo),
                n, len(todo), rank, size)  # fmt: skip
    with partial.open("rb" if have else "r+b") as fh:
        for c in todo:
            start, stop = chunks[c]
            rows = np.asarray(encode(list(texts[start:stop])), dtype=np.float32)
            if rows.shape != (stop - start, width):
                raise ValueError(f"encode gave {rows.shape} for rows {start}-{stop}, expected {(stop - start, width)}")
            _write_rows(fh, offset, start, rows)
            os.fsync(fh.fileno())
            with log.open("a") as out:
                out.write(f"{c}\n")
        if size > 1:  # every rank gets every chunk, one chunk in memory at a time
            device = _collective_device()
            for c, (start, stop) in enumerate(chunks):
                owner = c % size
                if owner == rank:
                    buf = torch.from_numpy(_read_rows(fh, offset, start, stop, width).copy()).to(device)
                else:
                    buf = torch.empty((stop - start, width), dtype=torch.float32, device=device)
                torch.distributed.broadcast(buf, src=owner)
                if owner != rank and not have:
                    _write_rows(fh, offset, start, buf.cpu().numpy())
            if not have:
                os.fsync(fh.fileno())
    if have:
        return np.load(path, mmap_mode="r")
    os.replace(partial, path)
    log.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")
