"""Ingest benchmark: 1,000,000 records, rows/s and peak RSS (target: <= 2 GiB RSS).

The full Alpaca 52k is not on these machines, so the records are the real
Alpaca records of ../shared/data/alpaca/alpaca_random_9k.json repeated, each
copy's instruction suffixed with a counter so every id differs (no record is
a duplicate). The synthetic file is written to a temp folder, then ingested
in a child process so the peak RSS is the ingest's own (ru_maxrss of that child).

    .venv/bin/python bench/bench_ingest.py [--records N] [--layout jsonl|json|both]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_random_9k.json"


def write_synthetic(path: Path, records: int, layout: str) -> None:
    """Repeat the real records with a counter suffix (ids all differ); stream to disk."""
    base = json.loads(ALPACA.read_text(encoding="utf-8"))
    with path.open("w", encoding="utf-8") as out:
        if layout == "json":
            out.write("[\n")
        for i in range(records):
            record = dict(base[i % len(base)])
            record["instruction"] = f"{record['instruction']} (#{i})"
            text = json.dumps(record, ensure_ascii=False)
            if layout == "json":
                out.write(text + (",\n" if i < records - 1 else "\n"))
            else:
                out.write(text + "\n")
        if layout == "json":
            out.write("]\n")


def child(source: str, store_dir: str) -> None:
    """Run in a fresh process: ingest, then print one JSON line of figures."""
    from gleaner.config import GleanerConfig
    from gleaner.store import Store
    from gleaner.tasks.ingest.ingest import run_ingest

    started = time.perf_counter()
    summary = run_ingest([source], Store(store_dir), "bench", GleanerConfig())
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(
        json.dumps(
            {
                "read": summary["read"],
                "kept": summary["kept"],
                "quarantined": summary["quarantined"],
                "duplicates": summary["duplicates"],
                "parts": summary["parts"],
                "seconds": seconds,
                "rows_per_s": summary["read"] / seconds,
                "peak_rss_mib": peak_kib / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--layout", choices=["jsonl", "json", "both"], default="both")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    layouts = ["jsonl", "json"] if args.layout == "both" else [args.layout]
    with tempfile.TemporaryDirectory(prefix="gleaner-bench-") as tmp:
        for layout in layouts:
            source = Path(tmp) / f"alpaca_x{args.records}.{layout}"
            started = time.perf_counter()
            write_synthetic(source, args.records, layout)
            size_mib = source.stat().st_size / 2**20
            print(
                f"[{layout}] wrote {args.records:,} records ({size_mib:,.0f} MiB) in "
                f"{time.perf_counter() - started:.1f}s",
                flush=True,
            )
            store = Path(tmp) / f"store-{layout}"
            result = subprocess.run(
                [sys.executable, __file__, "--child", str(source), str(store)],
                capture_output=True,
                text=True,
                check=False,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if result.returncode != 0:
                sys.exit(f"[{layout}] ingest failed:\n{result.stderr}")
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            ok = "OK" if figures["peak_rss_mib"] <= 2048 else "OVER the 2 GiB target"
            print(
                f"[{layout}] read {figures['read']:,} kept {figures['kept']:,} quarantined "
                f"{figures['quarantined']:,} duplicates {figures['duplicates']:,} "
                f"({figures['parts']} parts) in {figures['seconds']:.1f}s: "
                f"{figures['rows_per_s']:,.0f} rows/s, peak RSS {figures['peak_rss_mib']:,.0f} MiB "
                f"({ok})",
                flush=True,
            )
            source.unlink()


if __name__ == "__main__":
    main()
