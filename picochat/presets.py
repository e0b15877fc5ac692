"""Presets for `picochat run`: every setting of the whole pipeline, as plain data.

A preset is one `Preset` value (a frozen dataclass); `PRESETS` below holds the three that ship. Each field is
also a flag of `picochat run` (`--depth 6`, `--sft-mix ...`, `--rl`), so any value can be overridden without
editing code; the field's metadata gives the flag's help text and its parser (for a setting of a training stage,
those of its declaration in picochat/settings.py: `passed_to`). `picochat run --dry-run` prints
the resolved values.

    cpu       a 2-core machine without a GPU: the whole pipeline end to end in about 20 minutes. The model is tiny
              (depth 4, vocabulary 8,192) and trained on 1.6M tokens, so it knows little; what it shows is that
              every stage works on your data, and SFT teaches it its name.
    d12       one GPU (or a few): the depth-12 "research run" of the reference (~110M scaling parameters, ratio 8,
              0.5M-token steps, ~0.9B tokens). Minutes on 8 H100s, about an hour on one.
    speedrun  8 GPUs: the reference's GPT-2-grade run (REFERENCE.md E.1 run 6): depth 24, tokens = 8 x scaling
              parameters, 1M-token steps of 16 rows x 2,048 tokens per GPU -> 5,568 steps, 5.84B tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from picochat.common import nonempty_text, number_parser
from picochat.settings import PretrainSettings, RLSettings, SFTSettings


def _parser(kind: type, minimum: float | None = None, *, optional: bool = False):
    """A flag parser: `kind` with an optional lower bound (common.number_parser); `optional` also accepts
    "auto" (= None: the value is derived)."""
    parse = number_parser(kind, minimum)
    return _optional(parse) if optional else parse


def _optional(parse):
    def parse_optional(text: str):
        return None if text.strip().lower() in ("auto", "none") else parse(text)

    return parse_optional


def setting(help_text: str, parse=None) -> dict:
    """Field metadata: the flag's help and its parser (None: a boolean --flag / --no-flag)."""
    return field(metadata={"help": help_text, "parse": parse})


def passed_to(settings_class: type, name: str) -> Any:
    """A preset field that `picochat run` passes to a training stage as its setting `name` (picochat/settings.py):
    default, help and parser are that declaration's; a setting the stage derives when absent also takes "auto"."""
    declared = next(item for item in fields(settings_class) if item.name == name)
    parse = declared.metadata["parse"]
    if declared.default is None:
        parse = _optional(parse)
    metavar = "TEXT" if declared.metadata["parse"] in (nonempty_text, str) else "N"
    return field(
        default=declared.default,
        metadata={
            "help": declared.metadata["help"],
            "parse": parse,
            "metavar": metavar,
            "stage": settings_class,
            "name": name,
        },
    )


@dataclass(frozen=True, kw_only=True)  # keywords only: fields passed to a stage have its defaults
class Preset:
    # data
    download_shards: int = setting("ClimbMix train shards to download before pretraining (0: use the data folder "
                                   "as it is)", _parser(int, 0))  # fmt: skip
    tokenizer_shards: int = setting("of those, the shards the tokenizer trains on (downloaded first; the rest "
                                    "download while it trains)", _parser(int, 0))  # fmt: skip
    # tokenizer
    vocab_size: int = setting("tokenizer vocabulary", _parser(int, 266))
    tokenizer_max_chars: int = setting("characters the tokenizer trains on", _parser(int, 1))
    # pretraining
    architecture: str = passed_to(PretrainSettings, "architecture")
    depth: int = passed_to(PretrainSettings, "depth")
    max_seq_len: int = passed_to(PretrainSettings, "max_seq_len")
    device_batch_size: int = passed_to(PretrainSettings, "device_batch_size")
    total_batch_size: int | None = passed_to(PretrainSettings, "total_batch_size")
    num_iterations: int | None = passed_to(PretrainSettings, "num_iterations")
    target_param_data_ratio: float = passed_to(PretrainSettings, "target_param_data_ratio")
    eval_every: int = passed_to(PretrainSettings, "eval_every")  # SFT's too
    eval_tokens: int = passed_to(PretrainSettings, "eval_tokens")
    save_every: int = passed_to(PretrainSettings, "save_every")  # SFT's too
    # base model evaluation
    bpb_tokens: int = setting("tokens per split for the base model's bits per byte", _parser(int, 1))
    core_max_per_task: int | None = setting("CORE items per task (auto: all)", _parser(int, 1, optional=True))
    # supervised fine-tuning
    sft_mix: str = passed_to(SFTSettings, "mix")
    sft_num_iterations: int | None = passed_to(SFTSettings, "num_iterations")
    sft_device_batch_size: int = passed_to(SFTSettings, "device_batch_size")
    identity_name: str = passed_to(SFTSettings, "identity_name")
    identity_creator: str = passed_to(SFTSettings, "identity_creator")
    # chat evaluation
    chat_eval_tasks: str = setting("chat evaluations after SFT (comma-separated; `picochat eval chat`)", nonempty_text)
    chat_eval_max_problems: int | None = setting("problems per chat task (auto: all)",
                                                 _parser(int, 1, optional=True))  # fmt: skip
    chat_eval_max_new_tokens: int = setting("tokens per generated answer in the chat evaluations", _parser(int, 1))
    # reinforcement learning (GSM8K)
    rl: bool = setting("run RL on GSM8K after SFT (then evaluate GSM8K again)")
    rl_num_steps: int | None = passed_to(RLSettings, "num_steps")
    rl_examples_per_step: int = passed_to(RLSettings, "examples_per_step")
    rl_num_samples: int = passed_to(RLSettings, "num_samples")
    rl_max_new_tokens: int = passed_to(RLSettings, "max_new_tokens")
    # launching
    nproc_per_node: int = setting("processes (GPUs) for training and evaluation; > 1 launches torchrun",
                                  _parser(int, 1))  # fmt: skip

    def __post_init__(self):
        # Cross-field rules a flag parser cannot see on its own.
        if self.tokenizer_shards > self.download_shards:
            raise ValueError(f"--tokenizer-shards {self.tokenizer_shards} is more than --download-shards "
                             f"{self.download_shards}")  # fmt: skip

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def stage_settings(self, settings_class: type) -> tuple[Any, list[str]]:
        """(settings of that stage with this preset's values, the names this preset sets): what `picochat run`
        passes to the stage (settings.argv)."""
        values = {
            f.metadata["name"]: getattr(self, f.name) for f in fields(self) if f.metadata.get("stage") is settings_class
        }
        return settings_class(**values), list(values)


def setting_fields() -> list:
    """The Preset fields, in pipeline order (the order of the flags and of the printed table)."""
    return list(fields(Preset))


CPU = Preset(
    download_shards=0, tokenizer_shards=0,
    vocab_size=8192, tokenizer_max_chars=200_000_000,
    # ~3,000 tok/s on 2 cores: 400 steps of 4,096 tokens (1.6M tokens, 0.31 per scaling parameter) in ~10 min.
    depth=4, max_seq_len=512, device_batch_size=8, total_batch_size=4096, num_iterations=400,
    target_param_data_ratio=8.0, eval_every=50, eval_tokens=32_768, save_every=50,
    bpb_tokens=65_536, core_max_per_task=40,
    # Identity conversations many times over, a slice of instructions and GSM8K: the model must learn its name. With
    # identity:12 a sampled (temperature 0.6) answer to "What is your name?" named it 9 times in 10; identity:6, 3.
    sft_mix="identity:12,alpaca:0.5,gsm8k:0.02", sft_num_iterations=None, sft_device_batch_size=8,
    identity_name="Pico", identity_creator="the picochat team",
    chat_eval_tasks="ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,spelling", chat_eval_max_problems=16,
    chat_eval_max_new_tokens=96,
    rl=False, rl_num_steps=4, rl_examples_per_step=4, rl_num_samples=4, rl_max_new_tokens=96,
    nproc_per_node=1,
)  # fmt: skip

D12 = Preset(
    download_shards=24, tokenizer_shards=8,
    vocab_size=32_768, tokenizer_max_chars=2_000_000_000,
    depth=12, max_seq_len=2048, device_batch_size=32, total_batch_size=None, num_iterations=None,
    target_param_data_ratio=8.0, eval_every=250, eval_tokens=20 * 524_288, save_every=500,
    bpb_tokens=10 * 524_288, core_max_per_task=None,
    sft_mix="alpaca:2,code_alpaca:1,gpteacher_roleplay:1,glaive_toolcall:1,identity:2,gsm8k:2,arc:1,spelling:1",
    sft_num_iterations=None, sft_device_batch_size=16,
    identity_name="Pico", identity_creator="the picochat team",
    chat_eval_tasks="ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,spelling", chat_eval_max_problems=None,
    chat_eval_max_new_tokens=512,
    rl=False, rl_num_steps=None, rl_examples_per_step=16, rl_num_samples=16, rl_max_new_tokens=256,
    nproc_per_node=1,
)  # fmt: skip

# The speedrun is the d12 recipe scaled up: depth 24 on 8 GPUs, 16 rows per GPU, and the data and evaluation
# budgets that go with 5.8B training tokens.
SPEEDRUN = dataclasses.replace(
    D12, download_shards=170, depth=24, device_batch_size=16, eval_tokens=80 * 524_288, save_every=1000,
    bpb_tokens=40 * 524_288, nproc_per_node=8,
)  # fmt: skip

PRESETS: dict[str, Preset] = {"cpu": CPU, "d12": D12, "speedrun": SPEEDRUN}
