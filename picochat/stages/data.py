"""Placeholder, replaced by the real `picochat data` stage."""


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError
