"""picochat: train your own small ChatGPT end to end, on one CPU or many GPUs.

Importing the package does no work: every module imports its heavy dependencies (torch, pyarrow, ...) only
where it needs them, so `picochat --help` stays fast.
"""

__version__ = "0.1.0"
