"""Evaluations: bits per byte, CORE, chat tasks. Every result is a JSON file in <run>/eval/, named by result_name."""


def result_name(kind: str, stage: str, step: int | None) -> str:
    """eval/<this>.json: e.g. core_base_step000400 (`picochat run` looks for these to skip a finished evaluation)."""
    return f"{kind}_{stage}_" + (f"step{step:06d}" if step is not None else "latest")
