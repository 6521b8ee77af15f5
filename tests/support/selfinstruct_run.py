"""Self-instruct in a process of its own (for kill -9 tests): the stage logic, no Prefect."""

from __future__ import annotations

import argparse
import json

from gleaner.config import GleanerConfig
from gleaner.tasks.generate.selfinstruct import run_self_instruct


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--seeds", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--overrides", default="{}")
    args = parser.parse_args()
    config = GleanerConfig().with_overrides({
        "store.url": args.store, "generate.endpoint.base_url": args.base_url,
        "generate.endpoint.model": "stub-model", **json.loads(args.overrides)})
    summary = run_self_instruct(config, args.run_id, args.seeds, args.count)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
