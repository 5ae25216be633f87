"""`querytune launch`: `accelerate launch` (every flag of it) with a bounded wait for the other machines and one-line
errors, for jobs over several machines.

    querytune launch --config_file accelerate_configs/multi_node.yaml --machine_rank 0 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 -m querytune.train EXP

Plain `accelerate launch` waits forever in torchrun's rendezvous when a machine never starts (a typo in a host name,
a node that failed to boot), and a failed job ends in pages of tracebacks from the launcher. Here:

- the rendezvous waits `--join_timeout_s` (600 s unless given) for every machine, then this machine stops with one
  line saying how many joined and where it waited, exit 2;
- a machine that cannot reach machine 0 stops the same way;
- when a process of the job fails (its own `querytune: error: rank ...` line is above), the launcher adds one line
  and exits with that process's code instead of torchrun's traceback.
"""

from __future__ import annotations

import re
import sys

from querytune.errors import RunError, run_guarded

DEFAULT_JOIN_TIMEOUT_S = 600.0


def _with_join_timeout(argv: list[str], timeout: float) -> list[str]:
    """Add `timeout=` to `--rdzv_conf` (accelerate passes it to torchrun's rendezvous) unless it already names one."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--rdzv_conf" and i + 1 < len(argv):
            if "timeout=" not in argv[i + 1]:
                argv[i + 1] = ",".join(filter(None, [argv[i + 1], f"timeout={timeout:g}"]))
            return argv
        if arg.startswith("--rdzv_conf="):
            if "timeout=" not in arg:
                argv[i] = f"{arg},timeout={timeout:g}" if arg != "--rdzv_conf=" else f"--rdzv_conf=timeout={timeout:g}"
            return argv
    return ["--rdzv_conf", f"timeout={timeout:g}", *argv]


def _drop_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `name VALUE` / `name=VALUE` (an option of ours that accelerate's launcher does not know)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out


def _where(args) -> str:
    ip, port = getattr(args, "main_process_ip", None), getattr(args, "main_process_port", None)
    return f"{ip or '127.0.0.1'}:{port or 29500}"


def explain(err: BaseException, args, timeout: float) -> str | None:
    """The one line for a launcher failure, or None when `err` is not one this knows."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    machine = f"machine {getattr(args, 'machine_rank', 0) or 0} of {getattr(args, 'num_machines', 1) or 1}"
    text = " ".join(str(err).split())
    if isinstance(err, ChildFailedError):
        codes = sorted({f.exitcode for f in err.failures.values()})
        return (f"{machine}: {len(err.failures)} process(es) of the job failed (exit code {', '.join(map(str, codes))});"
                " the first error is above")  # fmt: skip
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:
        return (f"{machine}: only {joined[1]} of {joined[2]} machines joined the rendezvous at {_where(args)} within "
                f"{timeout:g} s: start the same command on every machine, each with its own --machine_rank, or give "
                "them longer with --join_timeout_s")  # fmt: skip
    if "connect" in text.lower() or "timed out" in text.lower():
        return (f"{machine}: could not reach machine 0 at {_where(args)} within {timeout:g} s ({type(err).__name__}): "
                "is machine 0 started, and is --main_process_ip/--main_process_port its address and a free port?")  # fmt: skip
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `querytune launch` and `python -m querytune.launch`."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = launch_command_parser()
    parser.prog = "querytune launch"
    parser.add_argument("--join_timeout_s", type=float, default=DEFAULT_JOIN_TIMEOUT_S,
                        help="how long the rendezvous waits for every machine before stopping (default 600)")  # fmt: skip
    args = parser.parse_args(argv)
    timeout = args.join_timeout_s
    if timeout <= 0:
        parser.error(f"--join_timeout_s must be positive, got {timeout:g}")
    script_at = argv.index(args.training_script) if args.training_script in argv else len(argv)
    head, tail = _drop_option(argv[:script_at], "--join_timeout_s"), argv[script_at:]
    args = parser.parse_args(_with_join_timeout(head, timeout) + tail)
    try:
        launch_command(args)
    except Exception as err:  # the launcher's failures: made one line where this knows them
        line = explain(err, args, timeout)
        if line is None:
            raise
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        if isinstance(err, ChildFailedError):
            print(f"querytune: error: {line}", file=sys.stderr)
            codes = [f.exitcode for f in err.failures.values() if f.exitcode and f.exitcode > 0]
            return codes[0] if codes else 1
        raise RunError(line) from None
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
