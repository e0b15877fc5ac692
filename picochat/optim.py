"""MuonAdamW: Muon for the matrices inside the transformer blocks, AdamW for everything else; 1..N ranks.

Muon (https://kellerjordan.github.io/posts/muon/) replaces a matrix's update by (approximately) the nearest
semi-orthogonal matrix, i.e. U V^T from the SVD U S V^T of the momentum: every direction the gradient points
in gets the same step size, however small its singular value. Per stack of same-shape matrices (K, m, n):

  1. Nesterov momentum        buf = lerp(buf, g, 1 - mu);  g = lerp(g, buf, mu)
  2. MuonEq                   rescale every row to the mean row norm ||G||_F / sqrt(m)
  3. Polar Express            X = G / (1.01 ||G||_F + 1e-6), then 5 odd quintic steps
                              X <- a X + b (X X^T) X + c (X X^T)^2 X with per-step (a, b, c) tuned so the
                              singular values are driven to 1 fast (https://arxiv.org/abs/2505.16932)
  4. Muon+                    rescale to ||X||_F = sqrt(min(m, n)) (the norm of an exact U V^T)
  5. NorMuon                  per-row (m >= n) or per-column mean of X^2, an EMA of it (beta2) in a small
                              factored buffer; X /= sqrt(EMA), then renormalise to the norm from step 4
                              (https://arxiv.org/abs/2510.05491): equalises the step size across neurons
  6. step + cautious decay    lr_eff = lr * sqrt(max(1, m / n));  mask = (X * W >= 0)
                              W <- W - lr_eff * X - lr_eff * wd * W * mask
     Cautious weight decay (https://arxiv.org/abs/2510.12402) only decays entries that the update is already
     moving towards zero, so decay never fights the gradient.

AdamW is the textbook one (decoupled weight decay applied first, bias-corrected moments, eps outside the sqrt),
with all math in fp32 whatever the storage dtype of the parameter.

Hyperparameters live in the param groups as plain floats (schedules set group["lr"], group["momentum"],
group["weight_decay"] every step). Before each update they are copied into 0-dim tensors that are allocated
once, so a compiled update function sees tensors with unchanged metadata and never recompiles.
Compiling is optional (compile=None compiles on CUDA only).

Distributed (torch.distributed initialised with world size N > 1; there is no DDP wrapper, this optimizer
does the gradient averaging, ZeRO-2 style):
  phase 1  launch every reduction asynchronously:
           AdamW, large params (>= 1024 elements, dim 0 divisible by N): reduce-scatter (average) along dim 0,
             each rank keeps 1/N of the rows and only their optimizer state;
           AdamW, small params: all-reduce (average), every rank updates the whole param;
           Muon: stack the K grads, zero-pad to a multiple of N and reduce-scatter, so rank r owns matrices
             r*c .. r*c + c - 1 (c = ceil(K / N)) and orthogonalises only those.
  phase 2  per group: wait for its reduction, update the owned part, launch an all-gather of the new values.
  phase 3  wait for the gathers and copy the gathered values into the params.
With N = 1 the same code runs with the communication left out.

Checkpoints. The live state is sharded, but state_dict() returns the FULL state (every rank gathers the
shards; in distributed mode it is a collective: all ranks must call it) keyed per parameter exactly as on a
single rank, and load_state_dict() takes that full state and keeps only this rank's shard. So a checkpoint
written by 2 ranks resumes on 1 rank and vice versa. Format:
  {"state": {param_index: {"step", "exp_avg", "exp_avg_sq"}            (AdamW; step is a 0-dim tensor)
                        | {"momentum_buffer" (m, n), "second_momentum_buffer" (m, 1) or (1, n)}},  (Muon)
   "param_groups": [{hyperparameters..., "params": [param_index, ...]}, ...]}
with param indices counted over the groups in order, as torch.optim does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from picochat.common import PicochatError, compile_backend
from picochat.hardware import is_distributed

# Polar Express coefficients (a, b, c) for the five iterations, in order.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
SHARD_MIN_NUMEL = 1024  # AdamW params smaller than this are all-reduced: sharding them saves nothing


# ----------------------------------------------------------------------------------------------------------
# The math, as plain functions on tensors (tested one by one). Scalars that change during training arrive as
# 0-dim tensors.


def equilibrate_rows(X: torch.Tensor) -> torch.Tensor:
    """MuonEq: scale every row of each (m, n) matrix to the same norm, ||X||_F / sqrt(m) (the RMS row norm),
    so rows with tiny gradients are not ignored by the orthogonalisation. ||X||_F is unchanged."""
    row_norms = X.norm(dim=-1, keepdim=True)
    target = X.norm(dim=(-2, -1), keepdim=True) / math.sqrt(X.size(-2))
    return X * (target / row_norms.clamp_min(1e-12))


def polar_express(X: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise each matrix of a (..., m, n) stack: push all singular values towards 1.

    Normalising by 1.01 ||X||_F puts every singular value in (0, 1) (the spectral norm is at most the
    Frobenius norm; 1.01 is safety margin for low-precision arithmetic). Each step applies the odd polynomial
    p(s) = a s + b s^3 + c s^5 to the singular values without an SVD: X <- a X + (b A + c A^2) X, A = X X^T.
    We work on the smaller Gram side: a tall matrix is transposed so A is min(m, n) squared.
    """
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS[:steps]:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def normuon_rescale(X: torch.Tensor, second_moment: torch.Tensor, beta2: torch.Tensor) -> torch.Tensor:
    """NorMuon: divide each row (m >= n) or column (m < n) of the orthogonalised update by the root of an EMA
    of its mean square, then restore the overall norm. second_moment, (K, m, 1) or (K, 1, n), is updated in
    place. Orthogonalisation equalises directions; this equalises neurons (rows of very different size)."""
    reduce_dim = -1 if X.size(-2) >= X.size(-1) else -2
    second_moment.lerp_(X.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2)
    norm_before = X.norm(dim=(-2, -1), keepdim=True)
    X = X / (second_moment.sqrt() + 1e-10)
    return X * (norm_before / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12))


def cautious_update(params: torch.Tensor, update: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor) -> None:
    """params -= lr * update + lr * wd * params * mask, mask = (update * params >= 0), in place: weight decay
    only where the update already moves the weight towards zero."""
    mask = (update * params >= 0).to(params.dtype)
    params.sub_(lr * update + (lr * weight_decay) * params * mask)


def muon_step(
    grads: torch.Tensor,
    params: torch.Tensor,
    momentum_buffer: torch.Tensor,
    second_moment: torch.Tensor,
    momentum: torch.Tensor,
    lr: torch.Tensor,
    weight_decay: torch.Tensor,
    beta2: torch.Tensor,
    ns_steps: int,
    orthogonalize_dtype: torch.dtype,
) -> None:
    """One Muon update of a stack of K same-shape matrices; params (K, m, n) is updated in place."""
    m, n = params.shape[-2:]
    momentum_buffer.lerp_(grads, 1 - momentum)
    update = grads.lerp(momentum_buffer, momentum)  # Nesterov: look one momentum step ahead
    update = equilibrate_rows(update.float())
    update = polar_express(update.to(orthogonalize_dtype), ns_steps).float()
    update = update * (math.sqrt(min(m, n)) / update.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12))
    update = normuon_rescale(update, second_moment, beta2)
    # Wide-output matrices (e.g. c_fc, 4d x d) get a larger step: an orthogonal update's entries are smaller
    # when m > n, and this keeps the per-entry RMS comparable across shapes.
    effective_lr = lr * math.sqrt(max(1.0, m / n))
    cautious_update(params, update, effective_lr, weight_decay)


def adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: torch.Tensor,
    beta1: torch.Tensor,
    beta2: torch.Tensor,
    eps: torch.Tensor,
    weight_decay: torch.Tensor,
) -> None:
    """One AdamW update in place (same math as torch.optim.AdamW), computed in fp32."""
    step.add_(1)
    weights = param.float()  # the param itself when it is already fp32
    grad = grad.float()
    weights.mul_(1 - lr * weight_decay)  # decoupled weight decay
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).add_((1 - beta2) * grad.square())
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denominator = exp_avg_sq.sqrt() / bias_correction2.sqrt() + eps
    weights.sub_((lr / bias_correction1) * exp_avg / denominator)
    if param.dtype != torch.float32:  # e.g. bf16 embeddings: write the fp32 result back into storage
        param.copy_(weights)


def fused_adamw_step(
    param, grad, exp_avg, exp_avg_sq, step, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    """adamw_step's math in one pass over the memory (PyTorch's fused AdamW kernel; fp32 params only).

    Uncompiled, adamw_step runs each of its ~12 operations as a separate pass over the embeddings and the lm_head,
    most of them allocating a full-size temporary: on a CPU those passes cost more than the matrices' Muon update
    (measured at d4, vocab 8,192: 85 ms of a 310 ms optimizer step, 20 ms fused). The compiled kernel fuses them
    itself, so this is for uncompiled runs (the CPU default). Same formula as torch.optim.AdamW."""
    step.add_(1)
    torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], [step], amsgrad=False, lr=lr, beta1=betas[0],
                        beta2=betas[1], weight_decay=weight_decay, eps=eps, maximize=False)  # fmt: skip


def _fused_adamw_applies(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """The fused kernel exists (torch >= 2.4 on CPU) and everything is fp32 (it updates params in their dtype, while
    adamw_step keeps the math in fp32 for low-precision storage)."""
    return (hasattr(torch, "_fused_adamw_") and param.dtype == grad.dtype == torch.float32
            and param.device.type in ("cpu", "cuda"))  # fmt: skip


_compiled: dict[str, object] = {}


def _kernel(name: str, compile: bool):
    function = {"adamw": adamw_step, "muon": muon_step}[name]
    if not compile:
        return function
    if name not in _compiled:
        _compiled[name] = torch.compile(function, dynamic=False, fullgraph=True, backend=compile_backend())
    return _compiled[name]


# ----------------------------------------------------------------------------------------------------------
# Communication helpers (gloo on CPU, NCCL on GPUs).


# torch 2.13 renamed the single-tensor collectives (the old names still work but warn on every call).
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_mean(output: torch.Tensor, input: torch.Tensor):
    """output (rows, ...) on rank r = the average over ranks of input[r * rows : (r + 1) * rows]."""
    return _reduce_scatter_single(output, input, op=dist.ReduceOp.AVG, async_op=True)


def _all_gather(output: torch.Tensor, input: torch.Tensor):
    """output (world * rows, ...) = every rank's input (rows, ...) concatenated in rank order."""
    return _all_gather_single(output, input, async_op=True)


def _all_reduce_mean(tensor: torch.Tensor):
    return dist.all_reduce(tensor, op=dist.ReduceOp.AVG, async_op=True)


# ----------------------------------------------------------------------------------------------------------
# The optimizer


class MuonAdamW(torch.optim.Optimizer):
    """Param groups are dicts with "kind": "adamw" (lr, betas, eps, weight_decay) or "muon" (lr, momentum,
    beta2, ns_steps, weight_decay; all params of one Muon group must be 2-D and of the same shape). Any other
    keys (name, initial_lr) are kept as they are.

    orthogonalize_dtype: dtype of the Polar Express matmuls (bf16 on modern GPUs, fp32 on CPU).
    compile: torch.compile the update functions (None: only when the params are on CUDA).
    distributed: None uses torch.distributed when it is initialised with more than one rank.
    """

    def __init__(
        self,
        param_groups: list[dict],
        *,
        orthogonalize_dtype: torch.dtype = torch.float32,
        compile: bool | None = None,
        distributed: bool | None = None,
    ):
        groups = []
        for index, group in enumerate(param_groups):
            group = dict(group)
            group["params"] = list(group["params"])
            kind = group.get("kind")
            if kind == "adamw":
                required = ("lr", "betas", "eps", "weight_decay")
            elif kind == "muon":
                group.setdefault("momentum", 0.95)
                group.setdefault("beta2", 0.9)
                group.setdefault("ns_steps", 5)
                group.setdefault("weight_decay", 0.0)
                required = ("lr",)
                shapes = {tuple(p.shape) for p in group["params"]}
                if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                    raise ValueError(f"Muon group {index}: params must be 2-D and of one shape, got {shapes}")
            else:
                raise ValueError(f"param group {index}: kind must be 'adamw' or 'muon', got {kind!r}")
            missing = [key for key in required if key not in group]
            if missing:
                raise ValueError(f"param group {index} ({kind}): missing {', '.join(missing)}")
            groups.append(group)
        super().__init__(groups, defaults={})
        self.orthogonalize_dtype = orthogonalize_dtype
        self.compile = compile
        self.distributed = distributed
        self._hyper: dict[int, dict[str, torch.Tensor]] = {}

    # ---- ranks and layout -----------------------------------------------------------------------------

    def _ranks(self) -> tuple[int, int]:
        """(rank, world_size) this optimizer communicates over; (0, 1) when not distributed."""
        use = self.distributed
        if use is None:
            use = is_distributed()
        if not use:
            return 0, 1
        return dist.get_rank(), dist.get_world_size()

    @staticmethod
    def _adamw_sharded(param: torch.Tensor, world: int) -> bool:
        return world > 1 and param.numel() >= SHARD_MIN_NUMEL and param.size(0) % world == 0

    @staticmethod
    def _muon_chunk(num_matrices: int, rank: int, world: int) -> tuple[int, int, int]:
        """(chunk size c, first owned index, number owned) for Muon stacks padded to a multiple of world."""
        chunk = math.ceil(num_matrices / world)
        first = rank * chunk
        return chunk, first, max(0, min(chunk, num_matrices - first))

    def _hyperparameters(self, index: int, group: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """The group's hyperparameters as 0-dim fp32 tensors on `device`, allocated once and refilled."""
        if index not in self._hyper:
            names = (
                ("lr", "beta1", "beta2", "eps", "weight_decay")
                if group["kind"] == "adamw"
                else ("lr", "momentum", "beta2", "weight_decay")
            )
            self._hyper[index] = {name: torch.zeros((), device=device) for name in names}
        tensors = self._hyper[index]
        values = dict(lr=group["lr"], weight_decay=group["weight_decay"])
        if group["kind"] == "adamw":
            values.update(beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"])
        else:
            values.update(momentum=group["momentum"], beta2=group["beta2"])
        for name, value in values.items():
            tensors[name].fill_(value)
        return tensors

    def _use_compile(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.compile is None else self.compile

    # ---- the step ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step does not take a closure")
        rank, world = self._ranks()
        jobs = []
        # Phase 1: gradients in (launch the reductions).
        for index, group in enumerate(self.param_groups):
            hyper = self._hyperparameters(index, group, group["params"][0].device)
            if group["kind"] == "adamw":
                for param in group["params"]:
                    jobs.append(self._adamw_reduce(group, hyper, param, rank, world))
            else:
                jobs.append(self._muon_reduce(group, hyper, rank, world))
        jobs = [job for job in jobs if job is not None]
        # Phase 2: update the owned part, launch the gathers.
        for job in jobs:
            if job["reduction"] is not None:
                job["reduction"].wait()
            job["gather"] = self._adamw_update(job, world) if job["kind"] == "adamw" else self._muon_update(job)
        # Phase 3: updated values out.
        for job in jobs:
            if job["gather"] is not None:
                job["gather"].wait()
            if job["kind"] == "muon" and world > 1:
                gathered = job["gathered"][: len(job["params"])]
                torch._foreach_copy_(job["params"], list(gathered.unbind(0)))

    def _adamw_reduce(self, group, hyper, param, rank, world):
        grad = param.grad
        if grad is None:
            if world == 1:
                return None  # nothing to do; with several ranks a missing grad counts as zeros so collectives match
            grad = torch.zeros_like(param)
        job = dict(kind="adamw", group=group, hyper=hyper, param=param, reduction=None)
        if world == 1:
            job["grad"] = grad
        elif self._adamw_sharded(param, world):
            rows = param.size(0) // world
            job["grad"] = torch.empty((rows, *param.shape[1:]), device=param.device, dtype=grad.dtype)
            job["reduction"] = _reduce_scatter_mean(job["grad"], grad.contiguous())
            job["rows"] = slice(rank * rows, (rank + 1) * rows)
        else:
            job["grad"] = grad
            job["reduction"] = _all_reduce_mean(grad)
        return job

    def _adamw_update(self, job, world):
        param, h = job["param"], job["hyper"]
        sharded = "rows" in job
        target = param[job["rows"]].clone() if sharded else param  # the part of the param this rank updates
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), device=param.device, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(target, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(target, dtype=torch.float32)
        use_compile = self._use_compile(param.device)
        if not use_compile and _fused_adamw_applies(target, job["grad"]):
            group = job["group"]
            fused_adamw_step(target, job["grad"], state["exp_avg"], state["exp_avg_sq"], state["step"], lr=group["lr"],
                             betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])  # fmt: skip
            return _all_gather(param, target) if sharded else None
        kernel = _kernel("adamw", use_compile)
        kernel(
            target,
            job["grad"],
            state["exp_avg"],
            state["exp_avg_sq"],
            state["step"],
            h["lr"],
            h["beta1"],
            h["beta2"],
            h["eps"],
            h["weight_decay"],
        )
        if sharded:
            return _all_gather(param, target)
        return None

    def _muon_reduce(self, group, hyper, rank, world):
        params = group["params"]
        if world == 1 and all(p.grad is None for p in params):
            return None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        chunk, first, owned = self._muon_chunk(len(params), rank, world)
        job = dict(kind="muon", group=group, hyper=hyper, params=params, first=first, owned=owned, reduction=None)
        if world == 1:
            job["grads"] = torch.stack(grads)
        else:
            # Zero-pad the stack to world * chunk matrices; rank r receives the average of matrices
            # r*chunk .. r*chunk + chunk - 1. The full-size stack is reused as the all-gather output later.
            stacked = torch.zeros((world * chunk, *params[0].shape), device=params[0].device, dtype=grads[0].dtype)
            stacked[: len(params)] = torch.stack(grads)
            job["grads"] = torch.empty((chunk, *params[0].shape), device=stacked.device, dtype=stacked.dtype)
            job["reduction"] = _reduce_scatter_mean(job["grads"], stacked)
            job["gathered"] = stacked
        return job

    def _muon_update(self, job):
        group, params, first, owned = job["group"], job["params"], job["first"], job["owned"]
        world_gather = "gathered" in job
        if owned > 0:
            state = self._muon_state(group)
            m, n = params[0].shape
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros((owned, m, n), device=params[0].device, dtype=torch.float32)
                moment_shape = (owned, m, 1) if m >= n else (owned, 1, n)
                state["second_momentum_buffer"] = torch.zeros(moment_shape, device=params[0].device)
            owned_params = torch.stack(params[first : first + owned]).float()
            h = job["hyper"]
            kernel = _kernel("muon", self._use_compile(params[0].device))
            kernel(
                job["grads"][:owned].float(),
                owned_params,
                state["momentum_buffer"],
                state["second_momentum_buffer"],
                h["momentum"],
                h["lr"],
                h["weight_decay"],
                h["beta2"],
                group["ns_steps"],
                self.orthogonalize_dtype,
            )
            if not world_gather:
                torch._foreach_copy_(params, list(owned_params.unbind(0)))
                return None
            job["grads"][:owned] = owned_params
        if not world_gather:
            return None
        job["grads"][owned:] = 0  # padding (or a rank that owns nothing) still sends a full-size chunk
        return _all_gather(job["gathered"], job["grads"])

    def _muon_state(self, group: dict) -> dict:
        # A Muon group's buffers belong to the whole stack; they are kept under the group's first param.
        return self.state[group["params"][0]]

    # ---- checkpoints: full state, whatever the number of ranks -----------------------------------------

    def state_dict(self) -> dict:
        """The full optimizer state, identical on every rank and independent of the world size (see the
        module docstring). In distributed mode this is a collective call: every rank must make it."""
        rank, world = self._ranks()
        state: dict[int, dict[str, torch.Tensor]] = {}
        groups = []
        index = 0
        for group in self.param_groups:
            params = group["params"]
            ids = list(range(index, index + len(params)))
            index += len(params)
            groups.append(
                {key: (list(v) if isinstance(v, tuple) else v) for key, v in group.items() if key != "params"}
                | {"params": ids}
            )
            if group["kind"] == "adamw":
                for param_id, param in zip(ids, params):
                    if not self.state[param]:
                        continue
                    entry = dict(self.state[param])
                    if self._adamw_sharded(param, world):
                        for name in ("exp_avg", "exp_avg_sq"):
                            full = torch.empty(param.shape, device=param.device, dtype=entry[name].dtype)
                            _all_gather(full, entry[name]).wait()
                            entry[name] = full
                    state[param_id] = {name: tensor.clone() for name, tensor in entry.items()}
            else:
                local = self.state[params[0]]
                if "momentum_buffer" not in local and world == 1:
                    continue
                full = self._gather_muon_state(group, local, rank, world)
                if full is None:
                    continue
                momentum, second = full
                for i, param_id in enumerate(ids):
                    state[param_id] = {
                        "momentum_buffer": momentum[i].clone(),
                        "second_momentum_buffer": second[i].clone(),
                    }
        return {"state": state, "param_groups": groups}

    def _gather_muon_state(self, group, local, rank, world):
        params = group["params"]
        if world == 1:
            return local["momentum_buffer"], local["second_momentum_buffer"]
        # Whether the group has state is the same on every rank (all ranks step together), except for a rank
        # that owns no matrix; agree on it with a tiny all-reduce before gathering.
        has_state = torch.tensor(float("momentum_buffer" in local), device=params[0].device)
        dist.all_reduce(has_state, op=dist.ReduceOp.MAX)
        if has_state.item() == 0:
            return None
        chunk, first, owned = self._muon_chunk(len(params), rank, world)
        m, n = params[0].shape
        moment_shape = (m, 1) if m >= n else (1, n)
        gathered = []
        for name, shape in (("momentum_buffer", (m, n)), ("second_momentum_buffer", moment_shape)):
            mine = torch.zeros((chunk, *shape), device=params[0].device)
            if owned > 0:
                mine[:owned] = local[name]
            full = torch.empty((world * chunk, *shape), device=params[0].device)
            _all_gather(full, mine).wait()
            gathered.append(full[: len(params)])
        return gathered

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full state (from state_dict(), saved by any number of ranks) and keep this rank's shard.
        Hyperparameters are restored from the saved groups too."""
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise PicochatError("optimizer state: expected 'state' and 'param_groups' entries")
        if len(saved_groups) != len(self.param_groups):
            raise PicochatError(
                f"optimizer state has {len(saved_groups)} param groups, the model needs {len(self.param_groups)}"
            )
        rank, world = self._ranks()
        saved_state = {int(key): value for key, value in saved_state.items()}
        self.state.clear()
        self._hyper.clear()
        for number, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            params = group["params"]
            label = f"optimizer state group {number} ({group.get('name', group['kind'])})"
            if saved.get("kind") != group["kind"] or len(saved.get("params", [])) != len(params):
                raise PicochatError(
                    f"{label}: checkpoint has kind {saved.get('kind')!r} with {len(saved.get('params', []))} "
                    f"params, the model has kind {group['kind']!r} with {len(params)}"
                )
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if key == "betas" else value
            entries = [saved_state.get(int(i)) for i in saved["params"]]
            expected, full_size = {
                "adamw": ({"step", "exp_avg", "exp_avg_sq"}, "exp_avg"),
                "muon": ({"momentum_buffer", "second_momentum_buffer"}, "momentum_buffer"),
            }[group["kind"]]
            for param, entry in zip(params, entries):
                if entry is not None and (
                    set(entry) != expected or tuple(entry[full_size].shape) != tuple(param.shape)
                ):
                    raise PicochatError(
                        f"{label}: saved state does not match a parameter of shape {tuple(param.shape)}"
                    )
            if group["kind"] == "adamw":
                for param, entry in zip(params, entries):
                    if entry is None:
                        continue
                    rows = slice(None)
                    if self._adamw_sharded(param, world):
                        size = param.size(0) // world
                        rows = slice(rank * size, (rank + 1) * size)
                    self.state[param] = {
                        "step": entry["step"].to(param.device, torch.float32).clone(),
                        "exp_avg": entry["exp_avg"][rows].to(param.device, torch.float32).clone(),
                        "exp_avg_sq": entry["exp_avg_sq"][rows].to(param.device, torch.float32).clone(),
                    }
            else:
                present = [entry is not None for entry in entries]
                if not any(present):
                    continue
                if not all(present):
                    raise PicochatError(f"{label}: state saved for only some of the stacked matrices")
                chunk, first, owned = self._muon_chunk(len(params), rank, world)
                if owned == 0:
                    continue
                mine = entries[first : first + owned]
                self.state[params[0]] = {
                    name: torch.stack([e[name] for e in mine]).to(params[0].device, torch.float32)
                    for name in ("momentum_buffer", "second_momentum_buffer")
                }
