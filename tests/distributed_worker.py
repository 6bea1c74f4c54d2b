"""Run by torchrun from test_distributed.py: train a few steps (from checkpoint $RESUME when set), then dump this
rank's field parameters and, with train.cache=memory, which training images it read."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from hyperfields.config import load_config
from hyperfields.training.build import build_run
from hyperfields.training.loop import fit

data, output = Path(sys.argv[1]), Path(sys.argv[2])
config = load_config(Path("configs/tiny.yaml"), sys.argv[3:])
run = build_run(config, data, output)
fit(run, Path(os.environ["RESUME"]) if os.environ.get("RESUME") else None)
field = run.accelerator.unwrap_model(run.field)
params = {name: p.detach().contiguous() for name, p in field.named_parameters() if p.requires_grad}
save_file(params, str(output / f"params-rank{run.accelerator.process_index}.safetensors"))
if run.cache is not None:  # which training images this process read, for train.cache=memory
    (output / f"cached-rank{run.accelerator.process_index}.json").write_text(json.dumps(sorted(run.cache.store)))
print(f"rank {run.accelerator.process_index} of {run.accelerator.num_processes} done", flush=True)
