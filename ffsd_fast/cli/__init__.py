"""The command-line layer: ``ffsd-train``, ``ffsd-eval``, ``ffsd-export`` and the report. Argument parsing and the
one-line error; the work is the trainer's."""
