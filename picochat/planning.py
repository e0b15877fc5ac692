"""`picochat run --dry-run`: what a pipeline would do, without doing it.

The plan names every stage with the exact command it runs (and whether the run folder already has it done), the
model's shape and the pretraining horizon as `picochat pretrain` derives them (the same function, so the dry run
and the real run cannot disagree), and an estimate of the time on this machine:

    pretraining seconds ~= training FLOPs / (processes x peak FLOP/s per device x utilisation)

Utilisation (MFU) is an assumption, stated in the output: 45% on a GPU in bf16 (the reference's d24 speedrun ran
at ~50% "bf16 MFU" with FP8 matmuls), and a CPU figure measured with the cpu preset on a 2-core machine. The other
stages (evaluations, SFT, report) are estimated as a fraction of pretraining, measured the same way.
"""

from __future__ import annotations

from pathlib import Path

from picochat.presets import Preset

GPU_MFU = 0.45
CPU_MFU = 0.30  # measured: the cpu preset's pretraining on 2 cores (~3,000 tok/s), against cpu_peak_flops
# Everything but pretraining, as a fraction of pretraining time (measured with the cpu preset on 2 cores; on GPUs
# the reference spends roughly the same share on base eval + SFT + chat eval).
OTHER_STAGES_FRACTION = 0.9
H100_BF16_PEAK = 989e12


def pretraining_plan(preset: Preset) -> dict:
    """`picochat pretrain`'s own derivation for this preset (shapes, batch, steps, tokens, FLOPs)."""
    from picochat.scaling import derive_plan
    from picochat.settings import PretrainSettings, defaults

    flags = defaults(PretrainSettings)
    flags.update(depth=preset.depth, max_seq_len=preset.max_seq_len, device_batch_size=preset.device_batch_size,
                 total_batch_size=preset.total_batch_size, num_iterations=preset.num_iterations,
                 target_param_data_ratio=preset.target_param_data_ratio, architecture=preset.architecture)  # fmt: skip
    return derive_plan(flags, preset.vocab_size, preset.nproc_per_node)


def estimate_seconds(training_flops: float, processes: int) -> tuple[float | None, str]:
    """Pretraining time on this machine's device, and how it was estimated."""
    import torch

    from picochat.hardware import autodetect_device, cpu_peak_flops, gpu_peak_flops

    device = autodetect_device()
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = gpu_peak_flops(name)
        if peak is None:
            return None, f"{name}: peak FLOP/s unknown"
        return training_flops / (processes * peak * GPU_MFU), f"{processes} x {name} at {GPU_MFU:.0%} MFU"
    if device == "cpu":
        peak, described = cpu_peak_flops()
        return training_flops / (peak * CPU_MFU), f"this CPU ({described}) at {CPU_MFU:.0%} MFU"
    return None, f"{device}: no estimate"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.1f} days"


def describe_plan(preset: Preset, preset_name: str, run_dir: Path, data_dir: Path) -> str:
    from picochat import pipeline

    state = pipeline.load_state(run_dir) if (run_dir / pipeline.PIPELINE_FILE).exists() else {}
    lines = [f"Plan for preset {preset_name} in {run_dir}:", ""]
    for number, stage in enumerate(pipeline.plan_stages(preset, run_dir, data_dir), 1):
        done = stage.name != "report" and pipeline.stage_complete(stage.name, run_dir, preset, state)
        command = pipeline.printable(pipeline.command_line(stage, preset.nproc_per_node))
        lines.append(f"{number:2d}. {stage.name:<15} {'(done, skipped) ' if done else ''}{command}")
    if preset.download_shards > (preset.tokenizer_shards or preset.download_shards):
        lines.append(f"    (shards {preset.tokenizer_shards}..{preset.download_shards} download in the background "
                     "while the tokenizer trains)")  # fmt: skip

    plan = pretraining_plan(preset)
    model = plan["model_config"]
    params = plan["parameters"]
    rows = [
        ("model", f"depth {model['n_layer']}, width {model['n_embd']}, {model['n_head']} heads of "
                  f"{model['n_embd'] // model['n_head']}, windows {plan['window_sizes']}"),
        ("parameters", f"{params['total']:,} total, {plan['scaling_params']:,} scaling"),
        ("vocabulary / row", f"{preset.vocab_size:,} tokens / {preset.max_seq_len:,} tokens"),
        ("batch", f"{plan['total_batch_size']:,} tokens per step = {preset.nproc_per_node} processes x "
                  f"{preset.device_batch_size} rows x {preset.max_seq_len} tokens x {plan['gradient_accumulation']}"
                  " accumulation"),
        ("steps", f"{plan['num_iterations']:,} ({plan['horizon_source']})"),
        ("tokens", f"{plan['training_tokens']:,} ({plan['tokens_per_scaling_param']:.2f} per scaling parameter)"),
        ("training FLOPs", f"{plan['training_flops']:.3e}"),
    ]  # fmt: skip
    seconds, how = estimate_seconds(plan["training_flops"], preset.nproc_per_node)
    rows.append(("pretraining time", f"~{_duration(seconds)} ({how})"))
    if seconds is not None:
        rows.append(("whole pipeline", f"~{_duration(seconds * (1 + OTHER_STAGES_FRACTION))} (other stages ~"
                                       f"{OTHER_STAGES_FRACTION:.0%} of pretraining)"))  # fmt: skip
    reference = plan["training_flops"] / (8 * H100_BF16_PEAK * 0.5)
    rows.append(("on 8 x H100", f"~{_duration(reference)} of pretraining at 50% bf16 MFU, ~${reference / 3600 * 24:.0f}"
                                " at $3 per GPU-hour"))  # fmt: skip
    width = max(len(name) for name, _ in rows)
    lines += ["", "Pretraining:"] + [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
