"""Write the RULER essay haystack snapshot, `src/draftapprox/data/essay.txt.gz`, from the running Python's
`pydoc_data.topics` (Python's reference documentation, PSF licence).

The shipped snapshot was made with CPython 3.11.7. It is a snapshot because that text changes between Python
versions (3.12's differs), and the same seed must give the same RULER prompt on every machine. Rerunning this
with another Python changes every generated prompt: do it only for a new, separately reported grid.

    python scripts/snapshot_essay.py
"""

import gzip
import hashlib
import sys
from pathlib import Path
from pydoc_data.topics import topics

OUT = Path(__file__).resolve().parents[1] / "src" / "draftapprox" / "data" / "essay.txt.gz"

text = " ".join(" ".join(topics[name].split()) for name in sorted(topics))
OUT.write_bytes(gzip.compress(text.encode(), compresslevel=9, mtime=0))
print(f"{OUT}: {len(text.split(' '))} words from Python {sys.version.split()[0]}, "
      f"text SHA-256 {hashlib.sha256(text.encode()).hexdigest()}")
