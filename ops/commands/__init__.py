"""The `protege` subcommands by subject; `ops.cli` puts them together."""
