"""Write the text snapshots, from the running Python's `pydoc_data.topics` (Python's reference documentation, PSF
licence): the RULER essay haystack `src/draftapprox/data/essay.txt.gz`, and the example prompt's reference text
`src/draftapprox/data/example.txt.gz` (the topics `draftapprox.examples.TOPICS`, in order).

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

from draftapprox.examples import TOPICS

DATA = Path(__file__).resolve().parents[1] / "src" / "draftapprox" / "data"

for name, order in (("essay.txt.gz", sorted(topics)), ("example.txt.gz", TOPICS)):
    text = " ".join(" ".join(topics[topic].split()) for topic in order)
    (DATA / name).write_bytes(gzip.compress(text.encode(), compresslevel=9, mtime=0))
    print(f"{DATA / name}: {len(text.split(' '))} words from Python {sys.version.split()[0]}, "
          f"text SHA-256 {hashlib.sha256(text.encode()).hexdigest()}")
