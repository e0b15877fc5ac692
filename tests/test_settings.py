"""picochat/settings.py: one declaration per setting gives the flag, its help, the resume merge, config.json's
flags block and the argv `picochat run` passes."""

from __future__ import annotations

import argparse

import pytest

from picochat.common import PicochatError
from picochat.presets import CPU
from picochat.settings import PretrainSettings, SFTSettings, add_flags, argv, as_flags, resolve


def parse(settings_class: type, line: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser, settings_class)
    return parser.parse_args(line)


def test_an_explicit_zero_is_a_flag_and_a_changed_fixed_setting_is_refused_on_resume():
    assert resolve(SFTSettings, parse(SFTSettings, []), None).seed == 0  # the default
    assert resolve(SFTSettings, parse(SFTSettings, []), {"seed": 3}).seed == 3  # a resume keeps the run's value
    assert resolve(SFTSettings, parse(SFTSettings, ["--seed", "3"]), {"seed": 3}).seed == 3
    with pytest.raises(PicochatError, match=r"--resume: --seed was 3 for this run, not 0 \(seed in its config"):
        resolve(SFTSettings, parse(SFTSettings, ["--seed", "0"]), {"seed": 3})
    kept = resolve(SFTSettings, parse(SFTSettings, ["--eval-every", "7"]), {"eval_every": 5, "save_every": 9})
    assert (kept.eval_every, kept.save_every) == (7, 9)  # a kept setting may change


def test_help_shows_the_declared_default_and_argv_round_trips():
    parser = argparse.ArgumentParser()
    add_flags(parser, PretrainSettings)
    assert "(default: 20)" in parser.format_help() and "(default: 0.65)" in parser.format_help()
    settings, names = CPU.stage_settings(PretrainSettings)
    again = resolve(PretrainSettings, parse(PretrainSettings, argv(settings, names)), None)
    assert as_flags(again) == as_flags(settings) and again.depth == CPU.depth == 4
