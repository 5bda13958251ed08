"""One module per `dreamtune` subcommand; each exposes ``register(subparsers)``."""

#: Subcommand modules, in the order `dreamtune --help` lists them.
COMMAND_MODULES = ["train", "sample", "tiny", "blend", "merge_lora", "extract_lora", "resize_lora", "convert",
                   "inspect_cmd", "caption", "evaluate", "push", "doctor"]
