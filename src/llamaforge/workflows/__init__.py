"""Workflows: one function per subcommand (pretrain, extend, sft, evaluate, report, init, export,
generate, push, demo). Each builds what the run is trained from, calls the building blocks (data,
train, eval) and publishes the result (publish/, model/io.py). They copy what they are given rather
than change it. Only the CLI imports this package."""
