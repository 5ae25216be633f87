"""Shared by the benchmark scripts: run one experiment through `querytune.train` in a subprocess."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(
    experiment: Path, output_dir: Path, overrides: list[str], log: Path, force_load: bool | None = None
) -> float:
    """Train one experiment in its own process (so peak memory is per run); returns the wall time in seconds.

    Benchmark hygiene for every script: the training holds the machine-wide CPU lock (`cpu_slot`), refuses to start
    while the 1-minute load average is above 1.5 (unless `force_load`, or QUERYTUNE_FORCE_LOAD=1), and leaves
    `bench_row.json` in the run directory with its wall time and the load average before and after.
    """
    if force_load is None:
        force_load = os.environ.get("QUERYTUNE_FORCE_LOAD") == "1"
    cmd = [sys.executable, "-m", "querytune.train", str(experiment), "--output_dir", str(output_dir),
           "--overwrite_output_dir", "true", "--disable_tqdm", "true", *overrides]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    with cpu_slot():
        load_before = check_load(force_load)
        start = time.perf_counter()
        with log.open("w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        wall = time.perf_counter() - start
        load_after = load_average()
    if proc.returncode != 0:
        raise RuntimeError(f"{experiment.name} failed (exit {proc.returncode}); see {log}")
    (Path(output_dir) / "bench_row.json").write_text(json.dumps(
        {"wall_s": wall, "load_before": load_before, "load_after": load_after, "forced": force_load}))  # fmt: skip
    return wall


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def uncommitted_note() -> str:
    """The note " (uncommitted changes)" when tracked files differ from HEAD (`machine_description()` names HEAD)."""
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()  # fmt: skip
    return " (uncommitted changes)" if dirty else ""


class OtherCpu:
    """CPU used by processes other than this one and its waited-for children while a measurement ran, in cores.

    The 1-minute load average cannot tell: a 2-thread benchmark lifts it to ~2 by itself. This takes the machine's
    busy time (`/proc/stat`) minus this process tree's own CPU time (`getrusage`), over the wall time.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        import resource

        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # user, nice, system, irq, softirq: not idle, iowait, or steal (time the hypervisor gave to other guests)
        busy = (sum(fields[:7]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))  # fmt: skip
        return time.monotonic(), busy, own

    def cores(self) -> float:
        wall, busy, own = (b - a for a, b in zip(self.start, self._sample(), strict=True))
        return max(0.0, (busy - own) / wall) if wall > 0 else 0.0


def check_load(force: bool = False, limit: float = 1.5, wait_s: float = 300) -> float:
    """Refuse to start a measurement on a busy machine: on 2 cores, a second torch process slows both 10-20x.

    Waits up to `wait_s` for the load to settle (it lags a finished job by a minute or so) before refusing.
    """
    deadline = time.monotonic() + wait_s
    while (load := load_average()) > limit and not force and time.monotonic() < deadline:
        time.sleep(10)
    if load > limit and not force:
        raise SystemExit(
            f"1-minute load average is {load:.2f} (> {limit}): something else is running. Wait for it, or pass "
            "--force_load and say so in the table."
        )
    return load


@contextlib.contextmanager
def cpu_slot(lock: str = os.environ.get("QUERYTUNE_CPU_LOCK", "/tmp/querytune-cpu.lock")):
    """Hold the machine-wide CPU lock for one measurement, so that tests and other benchmarks that take the same
    lock (`flock /tmp/querytune-cpu.lock pytest ...`) wait instead of running beside it."""
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def tree_rss_mb(root: int) -> float:
    """Resident memory of `root` and all its descendants, MB (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            pid, ppid = int(entry), int(fields[1])
            rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            children.setdefault(ppid, []).append(pid)
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / 2**20


def timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run `cmd`; its wall seconds and the peak resident memory of its process tree (MB)."""
    peak = 0.0
    with log.open("w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, tree_rss_mb(proc.pid))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed (exit {code}); see {log}")
    return wall, peak
