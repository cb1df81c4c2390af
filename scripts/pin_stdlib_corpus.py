"""Write the pinned stdlib corpus (suite/run/corpus/python-3.11.7-stdlib.xz) from this Python.

    python scripts/pin_stdlib_corpus.py

Only under Python 3.11.7: the corpus is that version's library sources, and every stored cell and
the shipped reference were trained on exactly these bytes (their ``corpus_sha256``). It refuses
another version rather than write other text under the same name, and checks the digest before
it writes.
"""

from __future__ import annotations

import hashlib
import lzma
import sys

from suite.run.data import STDLIB_CORPUS, STDLIB_SHA256, STDLIB_VERSION, stdlib_source_bytes


def main() -> None:
    if sys.version_info[:3] != STDLIB_VERSION:
        raise SystemExit(
            f"the pinned corpus is Python {'.'.join(map(str, STDLIB_VERSION))}'s library; "
            f"this is {sys.version.split()[0]}"
        )
    raw = stdlib_source_bytes()
    if hashlib.sha256(raw).hexdigest() != STDLIB_SHA256:
        raise SystemExit("this Python's library sources differ from the pinned corpus's digest")
    STDLIB_CORPUS.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {STDLIB_CORPUS} ({STDLIB_CORPUS.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
