"""Placeholder, replaced by the real stage."""


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError
