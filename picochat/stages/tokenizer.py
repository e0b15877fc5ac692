"""Placeholder, replaced by the real `picochat tokenizer` stage."""


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError
