"""ffsd-fast: a fast, faithful implementation of FFSD online knowledge distillation."""

__version__ = "0.1.0"
