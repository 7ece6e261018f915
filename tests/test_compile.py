"""torch.compile sees each model call whole: no graph breaks in the training step's forward, in validation, or in
HellaSwag scoring, for every architecture and loss (a break would split the graph and cost speed on GPUs)."""

import pytest
import torch
import torch._dynamo

from gpt2forge.models import ARCHITECTURES, Runtime, build_model, make_config
from gpt2forge.models.common import LOSS_KINDS


@pytest.mark.parametrize("loss", LOSS_KINDS)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_no_graph_breaks(arch, loss):
    model = build_model(make_config(arch, "tiny", n_layer=1, vocab_size=300, vocab_multiple=64), Runtime(loss=loss))
    idx, targets = torch.randint(0, 300, (2, 2, 32))
    calls = {"train step": (True, (idx, targets)), "validation": (False, (idx, targets)), "hellaswag": (False, (idx,))}
    for what, (training, args) in calls.items():
        model.train(training)
        with torch.set_grad_enabled(training):
            explanation = torch._dynamo.explain(model)(*args)
        assert explanation.graph_break_count == 0, (what, explanation.break_reasons)
        assert explanation.graph_count == 1, what
