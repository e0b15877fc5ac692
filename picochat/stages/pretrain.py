"""Placeholder, replaced by the real `picochat pretrain` stage."""


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError
