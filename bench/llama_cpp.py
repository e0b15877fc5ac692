"""Benchmark: a portable run's GGUF in llama.cpp (through `llama-cpp-python` from PyPI) against picochat itself.

What it checks, on a trained portable run (`picochat run --preset cpu --architecture portable`):
  1. `picochat export --format gguf` writes the GGUF (f16 by default; --quant q8_0 also works);
  2. llama.cpp's own tokenizer (llama-bpe pre-tokenizer, special tokens parsed) gives picochat's token ids for real
     documents, text full of digits / whitespace runs / contractions, and a rendered conversation;
  3. llama.cpp's greedy answer to "What is your name?" (the prompt picochat's engine builds, <|assistant_end|> stops)
     equals picochat's Engine's greedy answer, token for token;
  4. decode tokens/s of both, on the same prompt and the same threads.

llama-cpp-python compiles llama.cpp when it is installed (no wheels on PyPI): this takes minutes, so it goes into its
own virtual environment (default .venv-llama-cpp next to the project's .venv), created on the first run. The llama.cpp
side runs there as a subprocess (this file, --worker), and talks JSON. Prints a table, then ONE JSON line.

    python bench/llama_cpp.py --run portable-cpu                 # $PICOCHAT_HOME/runs/portable-cpu, its sft stage
    python bench/llama_cpp.py --run-dir path/to/run --stage base --quant q8_0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is your name?"
TRICKY = [
    "In 1999, 123456789 people's\n\n\n   spaced    out\t\ttabs \r\n DON'T 3.14159 x² 2024-12-31\n ",
    "    def f(x):\n        return x ** 2  # squares\n\n\n",
    "Ünïcödé — 日本語のテキスト, Привет мир 🎉👩‍💻 ",
]


def worker(request_path: str) -> None:
    """The llama.cpp side (runs in the llama-cpp-python environment): tokenise, then generate greedily."""
    from llama_cpp import Llama

    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    llm = Llama(model_path=request["gguf"], n_ctx=request["n_ctx"], n_threads=request["threads"], verbose=False)
    tokenised = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) for text in request["texts"]]
    chat_ids = llm.tokenize(request["chat_text"].encode("utf-8"), add_bos=False, special=True)
    stop = request["stop"]
    answer, start = [], time.perf_counter()
    first = None
    for token in llm.generate(request["prompt"], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if first is None:
            first = time.perf_counter()
        if token in stop or len(answer) >= request["max_tokens"]:
            break
        answer.append(token)
    end = time.perf_counter()
    decode_seconds = end - (first or end)
    print(json.dumps({
        "tokenised": tokenised, "chat_ids": chat_ids, "answer": answer, "seconds": end - start,
        "decode_tokens_per_s": (len(answer) - 1) / decode_seconds if len(answer) > 1 and decode_seconds > 0 else None,
        "llama_cpp_python": __import__("llama_cpp").__version__,
    }))  # fmt: skip


def ensure_llama_env(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing llama-cpp-python into {venv} (compiles llama.cpp: minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "llama-cpp-python"], check=True)
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run name (under $PICOCHAT_HOME/runs)")
    parser.add_argument("--run-dir", help="run folder")
    parser.add_argument("--stage", default=None, help="stage (default: the newest with weights)")
    parser.add_argument("--quant", default="f16", choices=["f32", "f16", "q8_0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--venv", default=str(ROOT / ".venv-llama-cpp"), help="llama-cpp-python's environment")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0

    import pyarrow.parquet as pq
    import torch

    from picochat import load
    from picochat.common import print_table, resolve_data_dir, resolve_run_dir
    from picochat.engine import Engine
    from picochat.export_portable import GGUF_FILE, export_gguf

    torch.set_num_threads(args.threads)
    run_dir = resolve_run_dir(args.run, args.run_dir)
    model, tokenizer = load(run_dir, stage=args.stage, device="cpu", compute_dtype=torch.float32)
    out = export_gguf(run_dir, run_dir / "export" / f"gguf-{args.quant}", stage=args.stage, quant=args.quant,
                      force=True)  # fmt: skip
    wiki = resolve_data_dir(None) / "pretrain" / "wikipedia_en" / "val_00000.parquet"
    documents = pq.read_table(wiki, columns=["text"]).column("text").to_pylist()[:20]
    texts = [*documents, *TRICKY]
    conversation = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.render_for_completion(conversation)
    chat_text = tokenizer.decode(prompt)  # specials included, as a chat template renders them

    engine = Engine(model, tokenizer)
    stop = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id]
    ours, first = [], None
    for column, _ in engine.generate(prompt, max_tokens=args.max_tokens, temperature=0):
        first = first or time.perf_counter()
        if column[0] in stop:
            break
        ours.append(column[0])
    end = time.perf_counter()
    ours_speed = (len(ours) - 1) / (end - first) if len(ours) > 1 else None

    request = out / "request.json"
    request.write_text(json.dumps({
        "gguf": str(out / GGUF_FILE), "n_ctx": model.config.sequence_len, "threads": args.threads, "texts": texts,
        "chat_text": chat_text, "prompt": prompt, "stop": stop, "max_tokens": args.max_tokens,
    }))  # fmt: skip
    python = ensure_llama_env(Path(args.venv))
    result = subprocess.run([str(python), __file__, "--worker", str(request)], capture_output=True, text=True)
    if result.returncode:
        print(result.stderr, file=sys.stderr)
        return 1
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    expected = [tokenizer.encode(text, prepend=tokenizer.bos_token_id) for text in texts]
    token_mismatches = [i for i, (a, b) in enumerate(zip(expected, theirs["tokenised"])) if a != b]
    report = {
        "bench": "llama_cpp",
        "run": str(run_dir),
        "quant": args.quant,
        "gguf_mib": round((out / GGUF_FILE).stat().st_size / 2**20, 2),
        "llama_cpp_python": theirs["llama_cpp_python"],
        "texts_tokenised": len(texts),
        "token_mismatches": token_mismatches,
        "chat_prompt_ids_equal": theirs["chat_ids"] == prompt,
        "answer_picochat": tokenizer.decode(ours),
        "answer_llama_cpp": tokenizer.decode(theirs["answer"]),
        "answers_equal": ours == theirs["answer"],
        "decode_tokens_per_s_picochat": ours_speed,
        "decode_tokens_per_s_llama_cpp": theirs["decode_tokens_per_s"],
        "threads": args.threads,
    }
    print(print_table([{"check": key, "value": value} for key, value in report.items()]))
    print(json.dumps(report))
    return 0 if report["answers_equal"] and not token_mismatches and report["chat_prompt_ids_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
