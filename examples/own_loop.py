"""Drive a two-stage curriculum from your own training loop (no stagetrain.fit).

Run: python examples/own_loop.py [CONFIG]
"""

import sys

import torch

import stagetrain

config_path = sys.argv[1] if len(sys.argv) > 1 else "examples/parity_two_stage.yaml"
curriculum = stagetrain.Curriculum.from_file(config_path)
model = curriculum.build_model()  # or any nn.Module of yours
optimizer = torch.optim.Adam(model.parameters())

for step in curriculum.steps():  # every global step, stage by stage
    if step.is_stage_start:
        print(f"step {step.step}: entering stage {step.stage.name!r}")
    inputs, targets = step.batch()  # this step's deterministic batch
    lr = step.set_lr(optimizer)  # the stage's LR schedule at its local time
    loss = step.loss(model(inputs), targets)  # the stage's weighted loss terms
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if (step.step + 1) % 500 == 0:
        print(f"step {step.step + 1} [{step.stage.name}] loss {loss.item():.4f} lr {lr:.2e}")

test = curriculum.eval_dataset(curriculum.config.evals[0])
with torch.no_grad():
    inputs, targets = test.get_batch(torch.arange(len(test)).numpy())
    accuracy = (model(inputs).argmax(-1) == targets).float().mean().item()
print(f"final test accuracy {accuracy:.4f}")
