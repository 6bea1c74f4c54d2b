"""Training a field: `train(config, data_dir, output, resume)` builds the run from a Config and runs the loop."""

from hyperfields.training.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
