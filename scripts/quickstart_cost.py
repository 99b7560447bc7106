"""The quick start's time and memory on this machine, written into the README and the getting-started page
(between their `quickstart` markers): the one command a new user runs, timed as a process of its own, with the
models already fetched and the kernels built (a first run adds both, and says so on one line each).

    python scripts/quickstart_cost.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from draftapprox.kernels.probe import cpu_name
from draftapprox.report_pages import splice

ROOT = Path(__file__).resolve().parents[1]
BESIDE = Path(sys.executable).parent / "draftapprox"  # this environment's command, activated or not
COMMAND = [str(BESIDE) if BESIDE.exists() else "draftapprox", "generate", "--example", "-m", "speckv", "-b", "0.25",
           "--chat", "--json"]
PAGES = (ROOT / "README.md", ROOT / "docs" / "getting-started.md")
START, END = "<!-- quickstart: start -->", "<!-- quickstart: end -->"
SHOWN = ("text", "method", "prompt_tokens", "budget_tokens", "kv_bytes_full", "kv_bytes_kept", "new_tokens")


def main() -> int:
    subprocess.run(COMMAND, check=True, capture_output=True)  # fetches and builds if needed: not timed
    began = time.perf_counter()
    done = subprocess.run(COMMAND, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    record = json.loads(done.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the larger of the two runs
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    text = (f"On {cpu_name()} with 2 cores, models cached: {seconds:.0f} s and {peak / 2**30:.1f} GiB peak memory "
            f"for the whole process, loading both models included ({date.today().isoformat()}, commit {commit}; "
            "`python scripts/quickstart_cost.py` measures it again). It printed, among the record's other keys:"
            "\n\n```json\n" + json.dumps({k: record[k] for k in SHOWN}) + "\n```")
    for page in PAGES:
        splice(page, text, (START, END))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
