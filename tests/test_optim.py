"""MuonAdamW: AdamW against torch.optim.AdamW, the Muon pieces one by one, state round trips, and a real
2-process gloo run (distributed step == single-process step on the averaged gradient; checkpoints move
between world sizes)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from picochat.common import PicochatError
from picochat.optim import (
    MuonAdamW,
    adamw_step,
    cautious_update,
    equilibrate_rows,
    fused_adamw_step,
    muon_step,
    normuon_rescale,
    polar_express,
)

# ---- AdamW ---------------------------------------------------------------------------------------------


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (3, 4, 5)]
    ours = [torch.randn(shape, requires_grad=True) for shape in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    settings = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    optimizer = MuonAdamW([dict(kind="adamw", params=ours, **settings)])
    reference = torch.optim.AdamW(theirs, **settings, foreach=False)
    for step in range(12):
        if step == 6:  # a schedule changes the LR mid-run: the refilled 0-dim tensors must pick it up
            optimizer.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = 0.003
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        optimizer.step()
        reference.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_adamw_updates_low_precision_params_in_fp32():
    param = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    optimizer = MuonAdamW([dict(kind="adamw", params=[param], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0)])
    param.grad = torch.ones(4, dtype=torch.bfloat16)
    optimizer.step()
    assert param.dtype == torch.bfloat16
    torch.testing.assert_close(param.float(), torch.full((4,), 0.9), atol=1e-2, rtol=0)
    assert optimizer.state[param]["exp_avg"].dtype == torch.float32


def test_fused_adamw_step_equals_the_written_out_math():
    # Uncompiled fp32 params take PyTorch's one-pass kernel; adamw_step stays the documented (and compiled) math.
    generator = torch.Generator().manual_seed(3)
    ours = torch.randn(64, 32, generator=generator)
    theirs = ours.clone()
    states = [[torch.zeros(64, 32), torch.zeros(64, 32), torch.zeros(())] for _ in range(2)]
    hyper = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    as_tensors = [torch.tensor(v) for v in (hyper["lr"], *hyper["betas"], hyper["eps"], hyper["weight_decay"])]
    for _ in range(5):
        grad = torch.randn(64, 32, generator=generator)
        fused_adamw_step(ours, grad, *states[0], **hyper)
        adamw_step(theirs, grad, *states[1], *as_tensors)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(states[0][1], states[1][1], atol=1e-9, rtol=1e-5)
    assert states[0][2].item() == states[1][2].item() == 5


def test_uncompiled_fp32_adamw_uses_the_fused_kernel(monkeypatch):
    import picochat.optim as optim

    calls = []
    monkeypatch.setattr(optim, "fused_adamw_step", lambda *args, **kwargs: calls.append(kwargs["lr"]))
    param = torch.ones(8, requires_grad=True)
    optimizer = MuonAdamW([dict(kind="adamw", params=[param], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0)],
                          compile=False)  # fmt: skip
    param.grad = torch.ones(8)
    optimizer.step()
    assert calls == [0.1]


# ---- Muon, piece by piece ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (32, 96)])
def test_polar_express_orthogonalises(shape):
    X = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    singular_values = torch.linalg.svdvals(polar_express(X, steps=5))
    # The 5 tuned steps land every singular value of a well-conditioned matrix within ~15% of 1.
    assert singular_values.min() > 0.8 and singular_values.max() < 1.2
    assert abs(singular_values.mean().item() - 1) < 0.05
    # and the polar factor keeps the singular vectors: U V^T of the input
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    cosine = torch.nn.functional.cosine_similarity(polar_express(X).flatten(), (U @ Vh).flatten(), dim=0)
    assert cosine > 0.99


def test_polar_express_works_on_a_stack():
    X = torch.randn(3, 16, 48)
    stacked = polar_express(X)
    for i in range(3):
        torch.testing.assert_close(stacked[i], polar_express(X[i]), atol=1e-5, rtol=1e-5)


def test_equilibrate_rows():
    X = torch.randn(2, 8, 5) * torch.logspace(-3, 2, 8).view(1, 8, 1)  # rows of wildly different size
    Y = equilibrate_rows(X)
    row_norms = Y.norm(dim=-1)
    expected = X.norm(dim=(-2, -1)) / math.sqrt(8)
    torch.testing.assert_close(row_norms, expected.unsqueeze(-1).expand(2, 8), rtol=1e-5, atol=0)
    torch.testing.assert_close(Y.norm(dim=(-2, -1)), X.norm(dim=(-2, -1)), rtol=1e-5, atol=0)


def test_normuon_equalises_rows_and_keeps_the_norm():
    X = torch.randn(1, 12, 4) * torch.linspace(0.1, 3, 12).view(1, 12, 1)  # tall: per-row statistics
    second_moment = torch.zeros(1, 12, 1)
    Y = normuon_rescale(X, second_moment, torch.tensor(0.9))
    torch.testing.assert_close(second_moment, 0.1 * X.square().mean(dim=-1, keepdim=True))
    torch.testing.assert_close(Y.norm(), X.norm(), rtol=1e-5, atol=0)
    row_rms = Y.square().mean(dim=-1).sqrt()
    torch.testing.assert_close(row_rms, row_rms.mean().expand_as(row_rms), rtol=1e-4, atol=0)
    wide_moment = torch.zeros(1, 1, 12)
    normuon_rescale(X.mT, wide_moment, torch.tensor(0.9))  # wide: per-column statistics
    torch.testing.assert_close(wide_moment, second_moment.mT)


def test_cautious_weight_decay_only_where_update_agrees_with_the_weight():
    params = torch.tensor([[1.0, -1.0], [2.0, -2.0]])
    update = torch.tensor([[0.5, 0.5], [-0.5, -0.5]])  # same sign as the weight at (0,0) and (1,1)
    lr, wd = torch.tensor(0.1), torch.tensor(0.5)
    expected = params - 0.1 * update - 0.1 * 0.5 * params * torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cautious_update(params, update, lr, wd)
    torch.testing.assert_close(params, expected)


def test_muon_step_size_follows_the_shape_rule():
    # With wd = 0 the applied update has Frobenius norm lr * sqrt(max(1, m/n)) * sqrt(min(m, n)):
    # Muon+ fixes the norm to sqrt(min(m, n)) and NorMuon preserves it.
    for m, n in [(64, 16), (16, 64)]:
        params = torch.randn(2, m, n)
        before = params.clone()
        muon_step(
            torch.randn(2, m, n), params, torch.zeros(2, m, n),
            torch.zeros((2, m, 1) if m >= n else (2, 1, n)), torch.tensor(0.95), torch.tensor(0.02),
            torch.tensor(0.0), torch.tensor(0.9), 5, torch.float32,
        )  # fmt: skip
        expected = 0.02 * math.sqrt(max(1, m / n)) * math.sqrt(min(m, n))
        torch.testing.assert_close((params - before).norm(dim=(-2, -1)), torch.full((2,), expected), rtol=1e-4, atol=0)


def test_muon_group_updates_each_matrix_like_a_group_of_one():
    torch.manual_seed(0)
    stacked = [torch.randn(8, 24, requires_grad=True) for _ in range(3)]
    alone = [p.detach().clone().requires_grad_() for p in stacked]
    settings = dict(kind="muon", lr=0.02, momentum=0.9, weight_decay=0.1)
    together = MuonAdamW([dict(params=stacked, **settings)])
    separately = MuonAdamW([dict(params=[p], **settings) for p in alone])
    for _ in range(3):
        for a, b in zip(stacked, alone):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        together.step()
        separately.step()
    for a, b in zip(stacked, alone):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_invalid_groups_are_rejected():
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", params=[torch.zeros(2, 3), torch.zeros(3, 2)], lr=0.1)])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(params=[torch.zeros(2)], lr=0.1)])
    with pytest.raises(ValueError, match="missing"):
        MuonAdamW([dict(kind="adamw", params=[torch.zeros(2)], lr=0.1)])


# ---- state round trips (single process) ------------------------------------------------------------------


def build_problem(seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """Params and groups that exercise every path: a large AdamW param (sharded when dim 0 divides the world),
    a small one (all-reduced), a large one whose dim 0 is odd (all-reduced), a Muon stack of 3 (padded to 4
    on 2 ranks) and a tall Muon stack of 1 (rank 1 owns nothing)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(8, 256), (10,), (3, 512), (16, 32), (16, 32), (16, 32), (48, 16)]
    params = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
    groups = [
        dict(kind="adamw", name="big", params=params[0:1], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
        dict(kind="adamw", name="small", params=params[1:3], lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0),
        dict(kind="muon", name="wide", params=params[3:6], lr=0.02, momentum=0.95, beta2=0.9, weight_decay=0.2),
        dict(kind="muon", name="tall", params=params[6:7], lr=0.03, momentum=0.9, beta2=0.95, weight_decay=0.1),
    ]
    return params, groups


def rank_gradients(step: int, rank: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=generator) for p in params]


def run_steps(optimizer, params, steps, world, first_step=0, rank=None):
    """Set gradients (this rank's, or the average over all ranks when rank is None) and step, changing the
    hyperparameters along the way like the schedules do."""
    for step in range(first_step, first_step + steps):
        per_rank = [rank_gradients(step, r, params) for r in range(world)]
        grads = per_rank[rank] if rank is not None else [sum(g) / world for g in zip(*per_rank)]
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        for group in optimizer.param_groups:
            group["lr"] *= 0.9
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.01 * step
        optimizer.step()


def assert_states_equal(a: dict, b: dict, atol: float = 1e-6):
    assert a["param_groups"] == b["param_groups"]
    assert sorted(a["state"]) == sorted(b["state"])
    for index in a["state"]:
        assert sorted(a["state"][index]) == sorted(b["state"][index])
        for name, tensor in a["state"][index].items():
            torch.testing.assert_close(tensor, b["state"][index][name], atol=atol, rtol=0)


def test_state_dict_round_trip_continues_identically():
    params, groups = build_problem()
    optimizer = MuonAdamW(groups)
    run_steps(optimizer, params, 3, world=1)
    saved = optimizer.state_dict()
    assert saved["state"][3]["momentum_buffer"].shape == (16, 32)
    assert saved["state"][6]["second_momentum_buffer"].shape == (48, 1)
    assert json.loads(json.dumps(saved["param_groups"])) == saved["param_groups"]  # JSON-ready hyperparameters

    copies = [p.detach().clone().requires_grad_() for p in params]
    _, copy_groups = build_problem()
    for group, new_params in zip(copy_groups, [copies[0:1], copies[1:3], copies[3:6], copies[6:7]]):
        group["params"] = new_params
    restored = MuonAdamW(copy_groups)
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    run_steps(optimizer, params, 2, world=1, first_step=3)
    run_steps(restored, copies, 2, world=1, first_step=3)
    for a, b in zip(params, copies):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_load_state_dict_rejects_a_mismatched_state():
    params, groups = build_problem()
    optimizer = MuonAdamW(groups)
    run_steps(optimizer, params, 1, world=1)
    saved = optimizer.state_dict()
    with pytest.raises(PicochatError, match="param groups"):
        optimizer.load_state_dict({"state": saved["state"], "param_groups": saved["param_groups"][:2]})
    wrong = dict(saved, state=dict(saved["state"]))
    wrong["state"][0] = dict(saved["state"][0], exp_avg=torch.zeros(4, 4))
    with pytest.raises(PicochatError, match="does not match a parameter of shape"):
        optimizer.load_state_dict(wrong)


# ---- two ranks over gloo --------------------------------------------------------------------------------


def save_state(path: str, state: dict, extra: dict[str, torch.Tensor] | None = None) -> None:
    tensors = {f"state.{i}.{name}": t.contiguous() for i, entry in state["state"].items() for name, t in entry.items()}
    tensors.update(extra or {})
    save_file(tensors, path, metadata={"param_groups": json.dumps(state["param_groups"])})


def load_state(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    tensors = load_file(path)
    with safe_open(path, "pt") as handle:
        groups = json.loads(handle.metadata()["param_groups"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    extra = {}
    for key, tensor in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = tensor
        else:
            extra[key] = tensor
    return {"state": state, "param_groups": groups}, extra


def distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # 1. Three distributed steps == three single-process steps on the averaged gradients.
        params, groups = build_problem()
        optimizer = MuonAdamW(groups)
        assert optimizer._ranks() == (rank, world)
        reference_params, reference_groups = build_problem()
        reference = MuonAdamW(reference_groups, distributed=False)
        run_steps(optimizer, params, 3, world, rank=rank)
        run_steps(reference, reference_params, 3, world)
        for a, b in zip(params, reference_params):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        # The sharded state really is sharded: rank r holds 4 of the 8 rows of the big AdamW param.
        assert optimizer.state[params[0]]["exp_avg"].shape == (4, 256)

        # 2. state_dict() gathers the full state, equal to the single-process one.
        full = optimizer.state_dict()
        assert_states_equal(full, reference.state_dict())
        if rank == 0:
            # For the main process: resume this 2-rank state on 1 rank and take one more step.
            reference_copy = MuonAdamW(build_problem()[1], distributed=False)
            reference_copy.load_state_dict(reference.state_dict())
            copy_params = [p for g in reference_copy.param_groups for p in g["params"]]
            for p, q in zip(copy_params, reference_params):
                p.data.copy_(q)
            run_steps(reference_copy, copy_params, 1, world, first_step=3)
            extra = {f"param.{i}": p.detach() for i, p in enumerate(params)}
            extra.update({f"expected.{i}": p.detach() for i, p in enumerate(copy_params)})
            save_state(os.path.join(out_dir, "two_ranks.safetensors"), full, extra)

        # 3. A 1-rank state loads into 2 ranks (each keeps its shard) and continues identically.
        resumed_params, resumed_groups = build_problem()
        for p, q in zip(resumed_params, reference_params):
            p.data.copy_(q)
        resumed = MuonAdamW(resumed_groups)
        resumed.load_state_dict(reference.state_dict())
        run_steps(resumed, resumed_params, 2, world, first_step=3, rank=rank)
        run_steps(reference, reference_params, 2, world, first_step=3)
        for a, b in zip(resumed_params, reference_params):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_and_checkpoints_cross_world_sizes(tmp_path):
    world = 2
    mp.spawn(distributed_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    saved, extra = load_state(str(tmp_path / "two_ranks.safetensors"))
    params, groups = build_problem()
    for i, p in enumerate(params):
        p.data.copy_(extra[f"param.{i}"])
    single = MuonAdamW(groups)
    single.load_state_dict(saved)
    assert_states_equal(single.state_dict(), saved, atol=0)
    run_steps(single, params, 1, world, first_step=3)
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), extra[f"expected.{i}"], atol=1e-6, rtol=0)


def test_changing_hyperparameters_never_recompiles(monkeypatch):
    # Trace with the "eager" backend (no code generation, so it is fast); what is checked is the graph
    # capture (fullgraph) and that refilled 0-dim hyperparameter tensors keep the guards satisfied.
    import torch._dynamo

    from picochat import optim

    monkeypatch.setenv("PICOCHAT_COMPILE_BACKEND", "eager")
    monkeypatch.setattr(optim, "_compiled", {})
    # Recompiles are counted rather than made errors: monkeypatching torch 2.13's error_on_recompile (an alias
    # kept for old code) leaves Dynamo's config without it for every later test in the process.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        params = [torch.randn(16, 32, requires_grad=True) for _ in range(2)] + [torch.randn(64, requires_grad=True)]
        copies = [p.detach().clone().requires_grad_() for p in params]

        def make(tensors, compile):
            return MuonAdamW(
                [
                    dict(kind="muon", params=tensors[:2], lr=0.02, weight_decay=0.1),
                    dict(kind="adamw", params=tensors[2:], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
                ],
                compile=compile,
            )

        compiled, eager = make(params, True), make(copies, False)
        for step in range(4):
            for p, q in zip(params, copies):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            for optimizer in (compiled, eager):
                for group in optimizer.param_groups:
                    group["lr"] *= 0.9
                    group["weight_decay"] = 0.1 - 0.02 * step
                optimizer.param_groups[0]["momentum"] = 0.85 + 0.03 * step
            compiled.step()
            eager.step()
            if step == 0:
                graphs_after_first_step = counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs_after_first_step, "an update function recompiled"
        for p, q in zip(params, copies):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    finally:
        torch._dynamo.reset()
