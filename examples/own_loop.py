"""Drive a two-stage curriculum from your own training loop (no stagetrain.fit).

The stage hooks give an own loop what fit() does: ``enter_stage`` applies each stage's
hand-off (carry / rewarm / reset) and freezing, ``set_lr`` its schedule, ``loss`` its
loss terms, and ``report`` feeds evaluations to its advance rule.

Run: python examples/own_loop.py [CONFIG]
"""

import sys

import stagetrain
from stagetrain.evaluation import evaluate

config_path = sys.argv[1] if len(sys.argv) > 1 else "examples/parity_two_stage.yaml"
curriculum = stagetrain.Curriculum.from_file(config_path)
model = curriculum.build_model()  # or any nn.Module of yours
test = curriculum.config.evals[0]
optimizer = None

for step in curriculum.steps():  # every global step, stage by stage
    if step.is_stage_start:
        print(f"step {step.step}: entering stage {step.stage.name!r}")
        optimizer = step.enter_stage(model, optimizer)  # hand-off + freezing
    inputs, targets = step.batch()  # this step's deterministic batch
    lr = step.set_lr(optimizer)  # the stage's LR schedule at its local time
    loss = step.loss(model(inputs), targets)  # the stage's weighted loss terms
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if (step.step + 1) % 500 == 0:
        metrics = evaluate(model, curriculum, test)
        print(
            f"step {step.step + 1} [{step.stage.name}] loss {loss.item():.4f} lr {lr:.2e} {metrics}"
        )
        step.report({f"{test.name}.{k}": v for k, v in metrics.items()})  # advance rules

print(f"final test accuracy {evaluate(model, curriculum, test)['accuracy']:.4f}")
