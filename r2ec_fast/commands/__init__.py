"""`r2ec-fast` subcommands, one module each, each with an `add_<name>(subparsers)`."""
