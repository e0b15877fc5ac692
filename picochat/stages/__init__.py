"""The stages behind the `picochat` subcommands; each module has add_arguments(parser) and run(args)."""
