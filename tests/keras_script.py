"""A Keras run of a curriculum, for the tests: in-process helpers and a command line.

The model's initial weights come from NumPy, so every process and every Keras backend
starts from the same weights. As a script (the backend is whatever ``KERAS_BACKEND``
says)::

    python tests/keras_script.py CONFIG.json RUN_DIR [--resume] [--kill-at STEP]
        [--out RESULT.npz]

``--kill-at`` SIGKILLs the process after that many global steps of this process;
``--out`` saves the final weights and, per step, the LR the optimizer used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np

from stagetrain import Curriculum, parse_config
from stagetrain.integrations.keras import fit_keras, learning_rate


def mlp(in_features: int, hidden: list[int], out: int, *, dropout: float = 0.0, seed: int = 0):
    """An MLP with weights drawn from NumPy (the same on every backend and in every process)."""
    layers: list[Any] = [keras.Input((in_features,))]
    for i, width in enumerate(hidden):
        layers.append(keras.layers.Dense(width, activation="relu", name=f"hidden{i}"))
        if dropout:
            layers.append(keras.layers.Dropout(dropout, seed=seed + i, name=f"dropout{i}"))
    layers.append(keras.layers.Dense(out, name="head"))
    model = keras.Sequential(layers, name="mlp")
    rng = np.random.default_rng(seed)
    model.set_weights(
        [(rng.standard_normal(w.shape) * 0.3).astype("float32") for w in model.get_weights()]
    )
    return model


class RecordLR(keras.callbacks.Callback):
    """The LR in the optimizer before every training batch (after fit_keras has set it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.lrs.append(learning_rate(self.model.optimizer))


class KillAt(keras.callbacks.Callback):
    """SIGKILL this process after ``steps`` training batches (counted over all stages)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.done = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.done += 1
        if self.done == self.steps:
            os.kill(os.getpid(), signal.SIGKILL)


def model_for(config: dict[str, Any]) -> Any:
    """The test model a config's ``model.args`` describe (``mlp`` arguments, plus dropout)."""
    args = config["model"]["args"]
    return mlp(
        args["in_features"], args["hidden"], args["out_features"], dropout=args.get("dropout", 0.0)
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)  # identical float reductions in every process
    except ImportError:
        pass
    config = json.loads(Path(args.config).read_text())
    model = model_for(config)
    config.pop("model")
    recorder = RecordLR()
    callbacks: list[Any] = [recorder]
    if args.kill_at:
        callbacks.append(KillAt(args.kill_at))
    fit_keras(
        model,
        Curriculum(parse_config(config)),
        run_dir=args.run_dir,
        resume=args.resume,
        callbacks=callbacks,
        progress=False,
    )
    print(f"backend {keras.backend.backend()}")
    if args.out:
        weights = {f"w{i}": w for i, w in enumerate(model.get_weights())}
        np.savez(args.out, lrs=np.array(recorder.lrs, dtype=np.float64), **weights)


if __name__ == "__main__":
    main(sys.argv[1:])
