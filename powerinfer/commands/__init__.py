"""One module per CLI subcommand (see `powerinfer.cli`)."""
