"""The methods by name: each method module registers its class with ``@register`` (one line), and the trainer,
evaluation, export, report and CLI find it here by the run's ``--method``."""

from ffsd_fast.errors import UserError
from ffsd_fast.method.base import Method, NetworkSpec

_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: ``cls`` becomes ``--method cls.name``."""
    _METHODS[cls.name] = cls
    return cls


def names() -> list[str]:
    return list(_METHODS)


def get(name: str) -> type[Method]:
    """The method class called ``name``; a one-line ``UserError`` listing the known ones otherwise."""
    if name not in _METHODS:
        raise UserError(f"unknown method {name!r}; known methods: {', '.join(_METHODS)}")
    return _METHODS[name]


def check_students(name: str, num_students: int) -> None:
    """``UserError`` unless method ``name`` can train ``num_students`` students."""
    least, why = get(name).min_students
    if num_students < least:
        raise UserError(f"--num-students must be at least {least} for {name} ({why}), got {num_students}")


def create(name: str, model: str, num_classes: int, num_students: int, image_size: int, /, **settings) -> Method:
    """Method ``name``'s networks, built as its constructor draws them; ``settings``: the run's configuration
    fields it reads (the rest take its ``defaults``)."""
    check_students(name, num_students)
    return get(name)(NetworkSpec(model, num_classes, num_students, image_size, settings))
