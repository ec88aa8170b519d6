"""Under FSDP2 (``fully_shard`` on 2 CPU processes, gloo, float64, each process half of every batch) every
first-party rule and projector works on its local shards and reduces its sums over the processes: the
parameters end within 1e-9 of a one-process run on the whole batches, and no full parameter vector is
ever gathered. The layers have odd sizes, so the shards are uneven. A component that does not declare
``shardable`` is refused with an error that says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

RUNS = {
    "sam over sgd-momentum, clipped": dict(rule="sam", lr=0.1, rho=0.05, momentum=0.9, max_grad_norm=0.5),
    "asam over adamw": dict(rule="sam", base="adamw", lr=1e-2, rho=0.5, adaptive=True),
    "asam with eta over sgd-momentum": dict(rule="sam", lr=0.1, rho=0.5, momentum=0.9, adaptive=True, eta=0.01),
    "sam over sgd-momentum, biases unperturbed": dict(rule="sam", lr=0.1, rho=0.05, momentum=0.9, unperturbed="bias"),
    "gsam over sgd-momentum": dict(rule="gsam", lr=0.1, rho=0.05, alpha=0.4, momentum=0.9),
    "gsam over adamw, biases unperturbed": dict(rule="gsam", base="adamw", lr=1e-2, rho=0.1, unperturbed="bias"),
    "wsam decoupled over adamw": dict(rule="wsam", base="adamw", lr=1e-2, rho=0.1, gamma=0.9, decoupled=True),
    "wsam coupled over sgd-momentum": dict(rule="wsam", lr=0.1, rho=0.05, gamma=0.9, decoupled=False, momentum=0.9),
    "friendly-sam over sgd-momentum": dict(rule="friendly-sam", lr=0.1, rho=0.05, sigma=1.0, lmbda=0.9, momentum=0.9),
    "looksam over sgd-momentum, clipped": dict(rule="sam", lr=0.1, rho=0.05, momentum=0.9, refresh_every=3, max_grad_norm=0.5),
    "periodic gsam over adamw, biases unperturbed": dict(
        rule="gsam", base="adamw", lr=1e-2, rho=0.1, refresh_every=3, reuse="none", unperturbed="bias"
    ),
    "ae-sam over sgd-momentum": dict(rule="sam", lr=0.1, rho=0.05, momentum=0.9, refresh="gradient-norm", refresh_ema=0.5),
    "friendly-sam looksam over adamw": dict(rule="friendly-sam", base="adamw", lr=1e-2, rho=0.1, refresh_every=2),
    "msam over sgd-momentum": dict(rule="msam", lr=0.1, rho=0.05, beta=0.9, momentum=0.9),
    "msam over adamw, biases unperturbed": dict(rule="msam", base="adamw", lr=1e-2, rho=0.1, unperturbed="bias"),
    "rbo gauss-newton, refresh_every=3": dict(rule="rbo", projector="gauss-newton", lr=0.5, rho=0.5, refresh_every=3),
    "entropy-sgd, noise off": dict(rule="entropy-sgd", lr=1.0, inner_steps=4, noise=0.0, scale_outer_by_gamma=False),
    "rbo gauss-newton": dict(rule="rbo", projector="gauss-newton", lr=0.5, rho=0.5),
    "rbo gauss-newton over adamw, device path": dict(
        rule="rbo", projector="gauss-newton", base="adamw", lr=0.05, rho=0.5, device_path=True
    ),
    "rbo footpoint": dict(rule="rbo", projector="footpoint", lr=0.5, rho=0.5, max_iters=5),
    "rbo lbfgs": dict(rule="rbo", projector="lbfgs", lr=0.5, rho=0.5, max_iters=5),
    "rbo newton": dict(rule="rbo", projector="newton", lr=0.5, rho=0.5, max_iters=3),
    "rbo tangent": dict(rule="rbo", projector="tangent", lr=0.5, rho=0.5),
    "local over sgd": dict(rule="local", lr=0.1),
}

SHARPNESS_AWARE = ("sam", "gsam", "wsam", "friendly-sam")
REFRESH_OPTIONS = {"refresh_every", "refresh"}  # runs with reuse steps: a step costs 1 or 2 passes

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    import nonlocal_opt
    from nonlocal_opt.plugins.manager import get_plugin_manager
    from nonlocal_opt_projectors.tangent import TangentProjector

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), sys.argv[1]
    runs = json.loads(sys.argv[2])


    class UnshardedTangent(TangentProjector):
        name = "unsharded-tangent"
        shardable = False


    class Plugin:
        @nonlocal_opt.hookimpl
        def nonlocal_opt_register_projectors(self, register):
            register(UnshardedTangent)


    get_plugin_manager().register(Plugin(), name="unsharded-test")


    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).double()


    def batches():
        data = torch.Generator().manual_seed(1)
        for _ in range(8):
            yield torch.randn(16, 6, generator=data, dtype=torch.float64), torch.randint(0, 3, (16,), generator=data)


    def groups(model, unperturbed):  # all parameters, or those named *unperturbed in a second group with perturb=False
        if unperturbed is None:
            return model.parameters()
        named = list(model.named_parameters())
        return [{"params": [p for n, p in named if not n.endswith(unperturbed)]},
                {"params": [p for n, p in named if n.endswith(unperturbed)], "perturb": False}]


    def train(model, settings, part):
        settings = dict(settings)
        params = groups(model, settings.pop("unperturbed", None))
        opt = nonlocal_opt.compose(params, settings.pop("rule"), **settings)
        losses = []
        for x, y in batches():
            x, y = x[part], y[part]

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            losses.append(float(opt.step(closure)))
        return opt, losses


    results = {}
    for name, settings in runs.items():
        reference_model = build()
        reference, ref_losses = train(reference_model, {**settings, "distributed": False}, slice(None))
        model = build()
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        opt, losses = train(model, settings, slice(8 * rank, 8 * rank + 8))
        local_sizes = [p.to_local().numel() for p in model.parameters()]
        whole = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
        expected = torch.nn.utils.parameters_to_vector(reference_model.parameters()).detach()
        results[name] = {
            "difference": (whole - expected).abs().max().item(),
            "moved": (whole - torch.nn.utils.parameters_to_vector(build().parameters())).abs().max().item(),
            "loss_difference": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "grad_evals": [opt.stats["grad_evals"], reference.stats["grad_evals"]],
            "local_sizes": local_sizes,
        }
    model = build()
    fully_shard(model)
    opt = nonlocal_opt.compose(model.parameters(), "rbo", projector="unsharded-tangent", lr=0.5)
    x, y = next(batches())

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = torch.cat([p.to_local().reshape(-1).clone() for p in model.parameters()])
    try:
        opt.step(closure)
        results["refusal"] = None
    except NotImplementedError as error:
        results["refusal"] = str(error)
    results["unchanged after refusal"] = torch.equal(before, torch.cat([p.to_local().reshape(-1) for p in model.parameters()]))
    with open(f"{out}/results-{rank}.json", "w") as handle:
        json.dump(results, handle)
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    script = out / "fsdp2_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("NONLOCAL_OPT_PLUGINS", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(script), str(out), json.dumps(RUNS)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"results-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_fsdp2_shards_match_one_process_on_whole_batches(fsdp2_results, name):
    for rank_results in fsdp2_results:
        run = rank_results[name]
        assert run["moved"] > 1e-3, "the run must train for the comparison to mean anything"
        assert run["difference"] <= 1e-9, run
        assert run["loss_difference"] <= 1e-9, run  # the loss at θ_t, averaged over the processes
        assert run["grad_evals"][0] == run["grad_evals"][1]
        if RUNS[name]["rule"] in SHARPNESS_AWARE and not REFRESH_OPTIONS & set(RUNS[name]):
            assert run["grad_evals"][0] == 2, "a sharpness-aware step costs 2 passes"
        if RUNS[name]["rule"] == "msam":
            assert run["grad_evals"][0] == 1, "a Momentum-SAM step costs 1 pass"
    sizes = [results[name]["local_sizes"] for results in fsdp2_results]
    assert sizes[0] != sizes[1], "odd layer sizes shard unevenly"


@pytest.mark.slow
def test_fsdp2_refuses_a_component_that_does_not_sum_over_shards(fsdp2_results):
    for rank_results in fsdp2_results:
        assert "UnshardedTangent ('unsharded-tangent')" in rank_results["refusal"]
        assert "shardable" in rank_results["refusal"]
        assert rank_results["unchanged after refusal"]
