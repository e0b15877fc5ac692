"""Chat tasks: datasets as conversations, with their scoring (evaluation, RL reward) and SFT mixtures.

    ARC, MMLU        categorical (one letter), for evaluation and training
    GSM8K            math with calculator calls; generative, with an RL reward
    HumanEval        Python functions checked in the sandbox; generative
    Spelling         spelling and letter counting (python tool); generative
    Identity         who the model is, from templates or the user's own file
    Conversations    the user's own data: OpenAI messages, ShareGPT, Alpaca
    TaskMixture      several tasks x epochs, shuffled; build_mixture parses --mix specs

Importing this package reads no data: each task loads its files when it is created.
"""

from picochat.tasks.arc import ARC
from picochat.tasks.common import CATEGORICAL, GENERATIVE, Task, TaskView, render_multiple_choice, shuffled, take
from picochat.tasks.conversations import Conversations
from picochat.tasks.gsm8k import GSM8K
from picochat.tasks.humaneval import HumanEval
from picochat.tasks.identity import Identity
from picochat.tasks.mixture import (
    BUILTIN_SOURCES,
    DEFAULT_SFT_MIX,
    TaskMixture,
    build_mixture,
    builtin_tasks,
    parse_mixture_spec,
)
from picochat.tasks.mmlu import MMLU
from picochat.tasks.spelling import Spelling

__all__ = [
    "ARC",
    "BUILTIN_SOURCES",
    "CATEGORICAL",
    "DEFAULT_SFT_MIX",
    "GENERATIVE",
    "GSM8K",
    "MMLU",
    "Conversations",
    "HumanEval",
    "Identity",
    "Spelling",
    "Task",
    "TaskMixture",
    "TaskView",
    "build_mixture",
    "builtin_tasks",
    "parse_mixture_spec",
    "render_multiple_choice",
    "shuffled",
    "take",
]
