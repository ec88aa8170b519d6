"""BatchNorm running statistics are updated only by the first pass of an RBO step (switchable)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import nonlocal_opt

from conftest import make_closure


def _bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


@pytest.mark.parametrize("freeze", [True, False])
def test_running_stats_after_rbo_step(freeze):
    model = _bn_model()
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    opt = nonlocal_opt.compose(model.parameters(), "rbo", lr=0.5, rho=1.0, max_iters=4, freeze_bn_stats=freeze)
    opt.step(make_closure(opt, lambda: torch.nn.functional.cross_entropy(model(x), y)))
    reference(x)  # one plain training-mode forward pass
    bn, ref = model[1], reference[1]
    if freeze:
        assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
        assert bn.num_batches_tracked.item() == 1
    else:
        assert bn.num_batches_tracked.item() == 1 + 4
        assert not torch.equal(bn.running_mean, ref.running_mean)
    assert bn.track_running_stats  # restored after the step


COMPILED = textwrap.dedent(
    """
    import copy, torch, nonlocal_opt

    rules = [("sam", {}), ("entropy-sgd", dict(inner_steps=3)), ("rbo", dict(projector="gauss-newton", max_iters=3)),
             ("rbo", dict(projector="footpoint", max_iters=3))]
    for style in ("torch.compile(model)", "model.compile()"):
        for rule, settings in rules:
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
            if style == "model.compile()":
                model.compile(backend="eager")
                compiled = model
            else:
                compiled = torch.compile(model, backend="eager")
            x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
            opt = nonlocal_opt.compose(model.parameters(), rule, lr=0.1, **settings)

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(compiled(x), y)
                loss.backward()
                return loss

            exact = True
            for _ in range(3):
                start = copy.deepcopy(model)
                opt.step(closure)
                start.train()(x)  # the one update the step should make: a plain pass at theta_t
                exact = exact and torch.equal(model[1].running_mean, start[1].running_mean) and opt.stats["grad_evals"] > 1
            print(style, rule, settings.get("projector", ""), int(model[1].num_batches_tracked), exact)
    """
)


def test_a_compiled_model_counts_one_batchnorm_update_per_step():
    """Compiled modules never run global module hooks: the layers are found through the optimized
    parameters instead, and pausing them makes the compiled model recompile once for the paused pass.
    In a subprocess: once ``torch.compile`` is used, every optimizer of the process looks its layers up."""
    done = subprocess.run([sys.executable, "-c", COMPILED], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 8 and all(line.endswith(" 3 True") for line in lines), done.stdout


def test_an_eager_layer_without_affine_parameters_is_found_by_the_hook():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6, affine=False), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    opt = nonlocal_opt.compose(model.parameters(), "sam", lr=0.1)
    for _ in range(2):
        opt.step(make_closure(opt, lambda: torch.nn.functional.cross_entropy(model(x), y)))
    assert model[1].num_batches_tracked.item() == 2
