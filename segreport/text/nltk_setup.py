"""Make WordNet (needed by METEOR) available to NLTK, offline-first.

Order: an NLTK corpus already on NLTK's path; else ``nltk.download`` when online; else the
``shared/nltk_data`` folder beside the checkout (or ``$SEGREPORT_NLTK_DATA``); else a clear error
with the one command that fixes it. The corpus is installed into ``<venv>/nltk_data``, a folder
NLTK searches by default, so nothing needs an environment variable at run time.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

FIX = (
    "WordNet (needed for METEOR) is not available. Fix it with one command:\n"
    f"  {sys.executable} -c \"import nltk; nltk.download('wordnet', download_dir='{Path(sys.prefix) / 'nltk_data'}')\"\n"
    "or point SEGREPORT_NLTK_DATA at a folder holding corpora/wordnet.zip."
)


def wordnet_available() -> bool:
    """True when NLTK can really open WordNet (a zipped corpus counts: ``find`` alone misses it)."""
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
        return bool(wordnet.synsets("lung"))
    except LookupError:
        return False


def _local_sources() -> list[Path]:
    here = Path(__file__).resolve().parents[2]
    env = os.environ.get("SEGREPORT_NLTK_DATA")
    return [Path(p) for p in (env,) if p] + [here.parent / "shared" / "nltk_data", Path.cwd().parent / "shared" / "nltk_data"]


def ensure_wordnet(verbose: bool = True) -> str:
    """Return how WordNet was found; raise RuntimeError with the fix when it cannot be had."""
    import nltk

    if wordnet_available():
        return "found"
    target = Path(sys.prefix) / "nltk_data"
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # a closed network must not hang set-up
    try:
        if nltk.download("wordnet", download_dir=str(target), quiet=True, raise_on_error=False) and wordnet_available():
            return "downloaded"
    except Exception:  # offline: fall through to the local copy
        pass
    finally:
        socket.setdefaulttimeout(old_timeout)
    for src in _local_sources():
        zipped = src / "corpora" / "wordnet.zip"
        if zipped.is_file():
            (target / "corpora").mkdir(parents=True, exist_ok=True)
            shutil.copy2(zipped, target / "corpora" / "wordnet.zip")
            nltk.data.path.insert(0, str(target))
            if wordnet_available():
                return f"copied from {src}"
    raise RuntimeError(FIX)


if __name__ == "__main__":
    try:
        how = ensure_wordnet()
    except RuntimeError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
    print(f"[nltk] WordNet {how}", file=sys.stderr)
