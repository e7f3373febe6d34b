"""``wrpo train`` under DeepSpeed in CPU processes: ``accelerate launch --config_file
examples/accelerate/zero3.yaml tests/distributed/ds_cpu_launch.py train ...`` (test_deepspeed_trainer.py).

A test shim, never on a GPU user's path (there: ``accelerate launch ... -m wrpo.cli train ...``, which
also runs on a CPU, only slower to start). Before running ``wrpo.cli.main.main`` unchanged it:

- skips the JIT build of DeepSpeed's shared-memory all-reduce op (~1 minute of g++ on first use; it
  serves inference only);
- with ``WRPO_DS_PROBE=FILE``, has rank 0 write there what ``deepspeed.initialize`` built (ZeRO stage,
  processes, partitioned parameters, accelerate's distributed type), so that the test knows DeepSpeed
  trained, not DDP.

Nothing else is needed on a CPU: ``DS_ACCELERATOR=cpu`` (set by the test) selects DeepSpeed's CPU
accelerator, and ``wrpo.train.config`` puts several processes without a GPU on gloo (``use_cpu``), which
keeps the DeepSpeed plugin that ``accelerate launch`` configured.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import deepspeed.comm  # noqa: F401  (imports deepspeed.comm.torch, patched below)

from wrpo.cli.main import main


def probe(initialize, path: Path):
    """``deepspeed.initialize`` that records the engine it returns (rank 0) into ``path``."""

    def recorded(*args, **kwargs):
        from accelerate.state import AcceleratorState

        out = initialize(*args, **kwargs)
        engine = out[0]
        params = list(engine.module.parameters())
        info = {
            "zero_stage": engine.zero_optimization_stage(),
            "world_size": engine.world_size,
            "distributed_type": str(AcceleratorState().distributed_type),
            "parameters": len(params),
            "partitioned": sum(1 for p in params if hasattr(p, "ds_id") and p.numel() == 0),
        }
        if engine.global_rank == 0:
            path.write_text(json.dumps(info))
        return out

    return recorded


if __name__ == "__main__":
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if os.environ.get("WRPO_DS_PROBE"):
        deepspeed.initialize = probe(deepspeed.initialize, Path(os.environ["WRPO_DS_PROBE"]))
    sys.exit(main(sys.argv[1:]))
