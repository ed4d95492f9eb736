"""The sparse-parity two-stage curriculum (examples/parity_two_stage.yaml), shortened, in Keras 3.

Stage 1 trains on biased bits, stage 2 on uniform bits, with the same Keras MLP
(50 -> 256 -> 256 -> 2) on any Keras backend:

    KERAS_BACKEND=torch python examples/keras_two_stage.py [--run-dir DIR] [--resume] [--quick]

(needs: pip install 'stagetrain[keras]'; KERAS_BACKEND=tensorflow or jax work the same
with those installed). The YAML's ``model`` section describes a torch MLP and is
dropped here: the Keras model below is trained instead.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras

import stagetrain
from stagetrain.integrations.keras import fit_keras

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--run-dir", default="runs/keras-parity")
parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
parser.add_argument("--quick", action="store_true", help="300 + 300 steps (a smoke test)")
args = parser.parse_args()

config = yaml.safe_load((Path(__file__).parent / "parity_two_stage.yaml").read_text())
config.pop("model")
easy, target = config["stages"]
if args.quick:
    easy["duration"], target["duration"] = "300ba", "300ba"
    config["eval_every"] = config["checkpoint"]["every"] = "100ba"
else:  # shortened from 1000 + 3000 steps
    easy["duration"], target["duration"] = "1000ba", "1000ba"
curriculum = stagetrain.Curriculum(stagetrain.parse_config(config))

keras.utils.set_random_seed(config["seed"])
model = keras.Sequential(
    [
        keras.Input((50,)),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(2),  # logits: the stages' cross_entropy is from_logits
    ]
)
result = fit_keras(model, curriculum, run_dir=args.run_dir, resume=args.resume, progress=False)
for span in result.timeline:
    print(f"stage {span.stage!r}: steps {span.start}-{span.end} ({span.reason})")
print(f"backend {keras.backend.backend()}; test accuracy {result.metrics['test']['accuracy']:.4f}")
