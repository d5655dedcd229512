"""One module per `legodnn` subcommand; see `pipelines.cli`."""
