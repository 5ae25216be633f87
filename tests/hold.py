"""Run a querytune command, but stop for good at a chosen training step, so that a test can kill it there.

    python tests/hold.py FLAG_FILE STEP CALL querytune-arguments...

When the CALL-th training of this process (1 = the first) finishes optimizer step STEP, the step number is written
to FLAG_FILE and the process sleeps until it is killed. Everything else is the real `querytune` command line; the
hold is a Trainer callback added to the run, as a sweep adds its pruner.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main() -> int:
    flag, step, call, *argv = sys.argv[1:]
    from transformers import TrainerCallback

    import querytune.train

    class Hold(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(step):
                Path(flag).write_text(str(state.global_step))
                time.sleep(3600)

    real_run = querytune.train.run
    calls = {"n": 0}

    def run(config, callbacks=None):
        calls["n"] += 1
        if calls["n"] == int(call):
            callbacks = [*(callbacks or []), Hold()]
        return real_run(config, callbacks)

    querytune.train.run = run  # `querytune train` and `querytune sweep` look it up at call time
    from querytune.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
