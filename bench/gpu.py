"""The GPU figures in one command: `python bench/gpu.py` on one H100/H200 measures, in at most ~8 minutes, and writes
bench/results/gpu-<device>-<date>.json (also printed as one JSON line):

  environment  torch / CUDA versions, device, nominal peaks, which attention kernels are present
  attention    every attention backend present against SDPA: training (outputs and gradients), a prefill chunk after
               cached tokens, and single-token decode with a window shorter than the cache
  training     d12 and d20 at seq 2048, window patterns SSSL and L, FP8 off and on, compile on: tokens/s, bf16 MFU,
               peak memory, compile seconds, graphs compiled after the warm-up steps (should be 0); and d20 once more
               with fp32 embedding storage, for the memory bf16 storage (the CUDA default) saves
  decode       d12 (random weights, bf16): time to first token, decode tokens/s at batch 1, 8 and 32, MFU and the
               fraction of the memory-bandwidth ceiling (bench/generate.py's accounting)
  resume       a 200-step d12 `picochat pretrain` whose validation bpb must fall, run once through, and once killed
               with SIGKILL after its step-100 checkpoint and resumed: the two final weights are compared

Time budget: items run in priority order and each starts only if --budget-seconds (default 400) leaves room; a skipped
item says so in the JSON, which still has every field. Nothing needs the network: the resume run trains on
$PICOCHAT_DATA_DIR's Wikipedia shard when there is one, else on this repository's own text files.

    python bench/gpu.py                          # on the GPU machine (no install needed: run from the repo root)
    python bench/gpu.py --smoke                  # tiny sizes on any device, under a minute on a CPU (the test suite)
    python bench/gpu.py --smoke --out /tmp/x.json

The smoke run writes no file unless --out is given. On a CPU it compiles with the "eager" backend (graph capture
only; inductor would generate C++ for minutes) unless $PICOCHAT_COMPILE_BACKEND says otherwise, and FP8 is emulated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a plain checkout: picochat need not be installed

import torch  # noqa: E402

from picochat import attention as attention_module  # noqa: E402
from picochat.common import compile_backend  # noqa: E402
from picochat.fp8 import enable_fp8, native_fp8_available  # noqa: E402
from picochat.gpt import GPT, GPTConfig  # noqa: E402
from picochat.hardware import peak_bandwidth, peak_flops, peak_memory_bytes  # noqa: E402
from picochat.stages.pretrain import resolve_embedding_dtype  # noqa: E402
from picochat.trainer import compiled_graph_count  # noqa: E402

VOCAB_SIZE = 32_768


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def allows(self, seconds: float) -> bool:
        return time.perf_counter() + seconds <= self.deadline


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------------
# Environment


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "peak_flops_bf16": peak_flops(device),
        "peak_bandwidth": peak_bandwidth(device)[0],
        "flash_attn": attention_module.flash_attn_available(),
        "flex_attention": attention_module.flex_attention_available(),
        "native_fp8": native_fp8_available(device),
        "compile_backend": compile_backend(),
    }


# ----------------------------------------------------------------------------------------------------------
# Attention backends against SDPA


def attention_checks(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[dict]:
    T, window = (64, 16) if smoke else (2048, 512)
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    q, k, v = rand(2, T, 4, 64), rand(2, T, 2, 64), rand(2, T, 2, 64)
    backends = ["flex"] + (["flash"] if attention_module.flash_attn_available() and device.type == "cuda" else [])
    results = []
    for backend in backends:
        row = {"backend": backend}
        for call in ("training", "prefill", "decode"):
            try:
                row[call] = _compare(call, backend, q, k, v, window, device)
            except Exception as error:  # recorded, not fatal: the rest of the figures still matter
                row[call] = {"error": f"{type(error).__name__}: {error}"[:300]}
        results.append(row)
    return results


def _compare(call: str, backend: str, q, k, v, window: int, device: torch.device) -> dict:
    T = q.size(1)

    def run(name: str, with_grad: bool):
        if call == "training":
            inputs = [t.detach().clone().requires_grad_(with_grad) for t in (q, k, v)]
            out = attention_module.attention(*inputs, window=window, backend=name)
            grads = torch.autograd.grad(out.float().square().sum(), inputs) if with_grad else None
            return out, grads, name
        cache_k = torch.zeros(q.size(0), T, k.size(2), k.size(3), device=device, dtype=q.dtype)
        cache_v = torch.zeros_like(cache_k)
        first = T // 2 if call == "prefill" else T - 1  # decode: one query with T - 1 > window cached keys
        attention_module.attention(q[:, :first], k[:, :first], v[:, :first], window=window, key_cache=cache_k,
                                   value_cache=cache_v, backend="sdpa")  # fmt: skip
        used = attention_module._choose_backend(q[:, first:], window, cached=True, requested=name)
        out = attention_module.attention(q[:, first:], k[:, first:], v[:, first:], window=window, key_cache=cache_k,
                                         value_cache=cache_v, cache_position=first, backend=name)  # fmt: skip
        return out, None, used

    with_grad = call == "training" and not (backend == "flex" and device.type == "cpu")  # no CPU flex backward
    ours, our_grads, used = run(backend, with_grad)
    reference, reference_grads, _ = run("sdpa", with_grad)
    scale = reference.float().abs().max().item()
    result = {"kernel": used, "max_abs_diff": (ours.float() - reference.float()).abs().max().item(), "scale": scale}
    result["grad_max_abs_diff"] = None
    if our_grads is not None:
        result["grad_max_abs_diff"] = max((a.float() - b.float()).abs().max().item()
                                          for a, b in zip(our_grads, reference_grads))  # fmt: skip
    tolerance = 2e-2 if q.dtype == torch.bfloat16 else 1e-4
    result["equal"] = result["max_abs_diff"] <= tolerance * max(scale, 1.0)
    return result


# ----------------------------------------------------------------------------------------------------------
# Training throughput


def training_item(device, depth: int, window_pattern: str, fp8: bool, seq_len: int, batch: int, warmup: int,
                  steps: int, vocab_size: int = VOCAB_SIZE, embedding_dtype: str = "auto") -> dict:  # fmt: skip
    reset_memory(device)
    config = GPTConfig.from_depth(depth, vocab_size=vocab_size, sequence_len=seq_len, window_pattern=window_pattern)
    torch.manual_seed(0)
    model = GPT.build(config, device)
    embeddings = resolve_embedding_dtype(embedding_dtype, device, model.compute_dtype)
    model.store_embeddings_in(embeddings)  # as picochat pretrain does
    row = {"depth": depth, "window_pattern": window_pattern, "fp8": fp8, "seq_len": seq_len,
           "device_batch_size": batch, "compute_dtype": str(model.compute_dtype).removeprefix("torch."),
           "embedding_dtype": str(embeddings).removeprefix("torch.")}  # fmt: skip
    if fp8:
        row["fp8_linears"] = enable_fp8(model, device)
    optimizer = model.setup_optimizer(compile=True)
    train_model = torch.compile(model, dynamic=False, backend=compile_backend())
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> torch.Tensor:
        loss = train_model(inputs, targets)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    start = time.perf_counter()
    step()
    synchronize(device)
    row["first_step_seconds"] = round(time.perf_counter() - start, 2)  # compilation, mostly
    for _ in range(warmup - 1):
        step()
    synchronize(device)
    graphs = compiled_graph_count()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens_per_second = steps * batch * seq_len / seconds
    peak = peak_flops(device)
    row.update(tokens_per_second=round(tokens_per_second, 1), step_seconds=round(seconds / steps, 4),
               mfu_bf16=None if not peak else round(model.flops_per_token(seq_len) * tokens_per_second / peak, 4),
               peak_memory_bytes=peak_memory_bytes(device), loss=round(loss.item(), 4),
               graphs_compiled_after_warmup=None if graphs is None else compiled_graph_count() - graphs)  # fmt: skip
    return row  # the next item's reset_memory frees what this one allocated


# ----------------------------------------------------------------------------------------------------------
# Decode


def decode_items(device, depth: int, batches: list[int], prompt_len: int, decode_tokens: int) -> list[dict]:
    sys.path.insert(0, str(REPO / "bench"))
    from generate import make_tokenizer, timed_generation, utilisation

    from picochat.engine import Engine
    from picochat.hardware import compute_dtype

    config = GPTConfig.from_depth(depth, vocab_size=VOCAB_SIZE, sequence_len=2048)
    torch.manual_seed(0)
    engine = Engine(GPT.build(config, device).eval(), make_tokenizer(), compute_dtype=compute_dtype(device), tool=None)
    prompt = torch.randint(0, 30_000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    peaks = (peak_flops(device), peak_bandwidth(device)[0])
    rows = []
    for batch in batches:

        def generate(tokens: int, batch: int = batch):
            return engine.generate(prompt, num_samples=batch, max_tokens=tokens, temperature=1.0, top_k=50, seed=0,
                                   stop_tokens=())  # fmt: skip

        timed_generation(generate(4), batch)  # warm-up
        ttft, rate, _ = min((timed_generation(generate(decode_tokens), batch) for _ in range(2)), key=lambda m: -m[1])
        row = {"depth": depth, "batch": batch, "prompt_tokens": prompt_len, "decode_tokens": decode_tokens,
               "ttft_ms": round(ttft * 1000, 2), "decode_tokens_per_second": round(rate, 1)}  # fmt: skip
        row.update(utilisation(engine.model, prompt_len, decode_tokens, batch, ttft, rate, peaks))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Resume: the real pretrain command, killed and resumed


def training_text(folder: Path) -> tuple[list[str], list[str]]:
    """(train files, val files): Wikipedia from $PICOCHAT_DATA_DIR if present, else this repo's text as jsonl."""
    shards = Path(os.environ.get("PICOCHAT_DATA_DIR", "/nonexistent")) / "pretrain" / "wikipedia_en"
    if (shards / "shard_00000.parquet").is_file() and (shards / "val_00000.parquet").is_file():
        return [str(shards / "shard_00000.parquet")], [str(shards / "val_00000.parquet")]
    sources = sorted(p for p in REPO.rglob("*") if p.suffix in (".py", ".md", ".sh") and ".venv" not in p.parts)
    documents = [p.read_text(encoding="utf-8", errors="replace") for p in sources]
    folder.mkdir(parents=True, exist_ok=True)
    cut = max(1, len(documents) // 10)
    for name, part in (("train.jsonl", documents[cut:]), ("val.jsonl", documents[:cut])):
        (folder / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in part), encoding="utf-8")
    return [str(folder / "train.jsonl")], [str(folder / "val.jsonl")]


def resume_item(device, smoke: bool, work: Path) -> dict:
    from safetensors.torch import load_file

    from picochat.data import iter_documents
    from picochat.tokenizer import Tokenizer

    train, val = training_text(work / "text")
    texts = [doc[0][:4000] for doc, _ in zip(iter_documents(train), range(400))]
    tokenizer = Tokenizer.train(texts, vocab_size=512 if smoke else 4096, trainer="hf")
    if smoke:
        size = ["--depth", "1", "--max-seq-len", "64", "--device-batch-size", "2", "--total-batch-size", "128"]
        steps, save, evals = 4, 2, 2
    else:
        size = ["--depth", "12", "--max-seq-len", "1024", "--device-batch-size", "16", "--total-batch-size", "16384"]
        steps, save, evals = 200, 100, 50
    args = [*train, "--val", *val, *size, "--num-iterations", str(steps), "--save-every", str(save), "--eval-every",
            str(evals), "--eval-tokens", str(4 * 16384 if not smoke else 256), "--sample-every", "0",
            "--keep-checkpoints", "3", "--batch-lr-scale", "0.5", "--device", device.type]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "PICOCHAT_NO_PROGRESS": "1", "PICOCHAT_HOME": str(work / "home")}
    runs = {}
    for name in ("through", "killed"):
        runs[name] = work / name
        tokenizer.save(runs[name] / "tokenizer")
    command = [sys.executable, "-m", "picochat", "pretrain"]
    start = time.perf_counter()
    # Both runs at once (one GPU has room for two d12 runs): the wall time of one run, not two. Logs go to files (a
    # pipe nobody reads would fill and stall the run).
    logs = {name: open(work / f"{name}.log", "w") for name in runs}  # noqa: SIM115 (closed below)
    processes = {name: subprocess.Popen([*command, "--run-dir", str(runs[name]), *args], env=env,
                                        stdout=subprocess.DEVNULL, stderr=logs[name]) for name in runs}  # fmt: skip
    latest = runs["killed"] / "base" / "state" / "latest.json"
    killed_at = None
    while processes["killed"].poll() is None:
        if latest.is_file():
            step = json.loads(latest.read_text()).get("step", 0)
            if step >= save:
                processes["killed"].send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.05)
    for process in processes.values():
        process.wait(timeout=400)
    for log in logs.values():
        log.close()
    if processes["through"].returncode != 0:
        return {"error": (work / "through.log").read_text()[-1500:]}
    row = {
        "steps": steps,
        "through_seconds": round(time.perf_counter() - start, 1),
        "killed_after_checkpoint": killed_at,
    }
    resumed = subprocess.run([*command, "--run-dir", str(runs["killed"]), "--resume", "--device", device.type], env=env,
                             capture_output=True, text=True, timeout=400)  # fmt: skip
    if resumed.returncode != 0:
        return {**row, "error": resumed.stderr[-1500:]}
    a = load_file(str(runs["through"] / "base" / "model.safetensors"))
    b = load_file(str(runs["killed"] / "base" / "model.safetensors"))
    differences = [(a[n].float() - b[n].float()).abs().max().item() / max(a[n].float().abs().max().item(), 1e-12)
                   for n in a]  # fmt: skip
    bpb = [json.loads(line)["val_bpb"] for line in (runs["through"] / "base" / "metrics.jsonl").read_text().splitlines()
           if '"eval"' in line]  # fmt: skip
    row.update(val_bpb=[round(x, 4) for x in bpb], val_bpb_falls=len(bpb) > 1 and bpb[-1] < bpb[0],
               max_relative_weight_difference=max(differences), weights_equal=max(differences) == 0.0)  # fmt: skip
    return row


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, measures nothing")
    parser.add_argument("--out", help="write the JSON here (default: bench/results/gpu-<device>-<date>.json; "
                                      "none for --smoke)")  # fmt: skip
    parser.add_argument("--budget-seconds", type=float, default=400.0, help="stop starting new items after this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
        if args.smoke:
            os.environ.setdefault("PICOCHAT_COMPILE_BACKEND", "eager")
    budget = Budget(args.budget_seconds)
    from picochat.hardware import compute_dtype

    dtype = compute_dtype(device)
    report: dict = {"benchmark": "gpu", "smoke": args.smoke, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "environment": environment(device)}  # fmt: skip
    report["attention"] = attention_checks(device, dtype, args.smoke)

    # Training items in priority order, each with the seconds it needs to be worth starting.
    # The "float32" item measures fp32 embedding storage's memory against the same item with the default storage.
    if args.smoke:
        grid = [(1, "SSSL", False), (1, "L", True)]  # every field in little time (a CPU stores fp32 embeddings)
        sizes, cost = dict(seq_len=256, batch=2, warmup=2, steps=1, vocab_size=512), 5
    else:
        grid = [
            (12, "SSSL", False),
            (20, "SSSL", False),
            (12, "SSSL", True),
            (20, "SSSL", True),
            (12, "L", False),
            (20, "L", False),
            (20, "SSSL", False, "float32"),
            (12, "L", True),
            (20, "L", True),
        ]
        sizes, cost = dict(seq_len=2048, batch=16, warmup=3, steps=5), 75
    grid = [dict(zip(("depth", "window_pattern", "fp8", "embedding_dtype"), item)) for item in grid]
    report["training"] = []
    report["decode"] = report["resume"] = None
    later = grid[2:]
    for item in grid[:2]:
        report["training"].append(_item(budget, cost, lambda i=item: training_item(device, **i, **sizes), item))
    decode = (dict(depth=1, batches=[1, 8, 32], prompt_len=16, decode_tokens=4) if args.smoke
              else dict(depth=12, batches=[1, 8, 32], prompt_len=512, decode_tokens=128))  # fmt: skip
    report["decode"] = _item(budget, 5 if args.smoke else 40, lambda: decode_items(device, **decode), {})
    with tempfile.TemporaryDirectory(prefix="picochat-gpu-") as work:
        report["resume"] = _item(budget, 10 if args.smoke else 180, lambda: resume_item(device, args.smoke, Path(work)),
                                 {})  # fmt: skip
    for item in later:
        report["training"].append(_item(budget, cost, lambda i=item: training_item(device, **i, **sizes), item))
    report["seconds"] = round(args.budget_seconds - (budget.deadline - time.perf_counter()), 1)

    line = json.dumps(report)
    out = args.out
    if out is None and not args.smoke:
        slug = "".join(c if c.isalnum() else "-" for c in report["environment"]["device"].lower()).strip("-")
        out = str(REPO / "bench" / "results" / f"gpu-{slug}-{time.strftime('%Y%m%d')}.json")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(line, flush=True)


def _item(budget: Budget, seconds: float, measure, identity: dict):
    """Run one measurement if the budget leaves `seconds`; a failure or a skip is recorded in its place."""
    if not budget.allows(seconds):
        return {**identity, "skipped": "time budget"}
    try:
        return measure()
    except Exception as error:
        return {**identity, "error": f"{type(error).__name__}: {error}"[:500]}


if __name__ == "__main__":
    main()
