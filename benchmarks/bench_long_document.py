"""``mdm-data prepare`` on one huge single-line document: peak memory and time, in pieces vs whole.

    python benchmarks/bench_long_document.py [--mb 47] [--work outputs/bench_long_document]

Writes a single-line ``.txt`` document of ``--mb`` megabytes (random words of the shipped corpus), trains a
small byte-level BPE on the corpus, then prepares the document twice, each in a fresh process: as ``prepare``
does (pieces of ``PIECE_CHARS`` characters, cut before a space that starts a word) and whole (the document
handed to the tokenizer in one call, what ``prepare`` did before). Prints the peak resident memory of each
process (``wait4``'s ``ru_maxrss``), its wall time, the progress lines it logged, and whether both wrote the
same tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"

CHILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from megatron_mdm.data import prepare as p
if sys.argv[4] == "whole":
    p.PIECE_CHARS = 1 << 40
p.prepare([sys.argv[1]], sys.argv[2], sys.argv[3], 2048)
"""


def _run(doc: Path, tok: Path, out: Path, mode: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(doc), str(tok), str(out), mode], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{mode}: exit {p.returncode}\n{log[-3000:]}")
    digest = hashlib.sha256()
    for f in sorted(out.glob("*.tar")):
        digest.update(f.read_bytes())
    return {"mode": mode, "peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall,
            "progress_lines": log.count("% of input"), "tokens_sha256": digest.hexdigest()[:12]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=47.0, help="size of the single-line document")
    ap.add_argument("--work", default="outputs/bench_long_document")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from megatron_mdm.data.readers import iter_documents
    from megatron_mdm.tokenization import train_bpe_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = work / "tok"
    if not tok.exists():
        train_bpe_tokenizer([str(CORPUS)], 4096, tok, max_docs=2000)
    words = sorted({w for _, _, t in iter_documents(str(CORPUS)) for w in t.split()})
    doc = work / f"doc-{args.mb:g}mb.txt"
    if not doc.exists():
        rng, size, parts = random.Random(0), int(args.mb * 1e6), []
        while size > 0:
            w = rng.choice(words)
            parts.append(w)
            size -= len(w) + 1
        doc.write_text(" ".join(parts) + "\n")
    print(f"document: {doc} ({doc.stat().st_size / 1e6:.1f} MB, one line), tokenizer: 4096-token byte-level BPE")
    rows = []
    for mode in ("pieces", "whole"):
        out = work / f"out-{mode}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        rows.append(_run(doc, tok, out, mode))
        r = rows[-1]
        print(f"{mode:7s} peak RSS {r['peak_rss_mib']:8.0f} MiB | {r['wall_s']:6.1f} s | "
              f"{r['progress_lines']} progress lines | tokens {r['tokens_sha256']}")
    print(f"whole / pieces peak memory: {rows[1]['peak_rss_mib'] / rows[0]['peak_rss_mib']:.2f}x; same tokens: "
          f"{rows[0]['tokens_sha256'] == rows[1]['tokens_sha256']}")


if __name__ == "__main__":
    main()
