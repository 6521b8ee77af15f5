"""Run the toy stage as a flow, in a process of its own (for kill -9 tests) or in the test's."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from prefect import flow
from prefect_ray import RayTaskRunner

from gleaner.config import GleanerConfig, StageSection
from gleaner.engine import run_stage
from tests.support.toy_stage import ToyStage


@flow(name="toy", flow_run_name="toy-{run_id}", task_runner=RayTaskRunner(),
      validate_parameters=False)
def toy_flow(run_id: str, config: GleanerConfig, control: str, section: dict[str, Any],
             version: str = "v1", kind: str = "task") -> dict[str, Any]:
    stage = ToyStage(StageSection.model_validate(section), control, version, kind)
    return run_stage(stage, config, run_id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--section", default="{}")
    args = parser.parse_args()
    import ray.cloudpickle

    from gleaner.runtime import execution_environment
    from tests.support import toy_stage

    ray.cloudpickle.register_pickle_by_value(toy_stage)  # Ray workers do not see tests/
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    config = GleanerConfig().with_overrides({"store.url": args.store})
    with execution_environment(config):
        summary = toy_flow(run_id=args.run_id, config=config, control=args.control,
                           section=json.loads(args.section))
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
