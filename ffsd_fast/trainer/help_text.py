"""``--help`` text: every option shows its default, and no reStructuredText markup (the docstrings' double
backquotes) reaches a terminal."""

import argparse


def plain(text: str) -> str:
    """``text`` without reStructuredText's inline-literal quotes."""
    return text.replace("``", "")


def _shown(default: object) -> str:
    return _words(default).replace("%", "%%")  # argparse %-formats every help string


def _words(default: object) -> str:
    if default is True:
        return "on"
    if default is False:
        return "off"
    if default is None:
        return "none"
    if isinstance(default, list | tuple):
        return " ".join(map(str, default))
    return str(default)


def with_default(help_text: str, default: object) -> str:
    """The help of an option, ending with its default unless it already says what the default is."""
    help_text = plain(help_text)
    if "default" in help_text:
        return help_text
    return f"{help_text} (default: {_shown(default)})"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter with every option's default shown (``with_default``) and RST quotes removed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.required
            or action.default is argparse.SUPPRESS
            or isinstance(action, argparse._HelpAction)
        ):
            return plain(text)
        return with_default(text, action.default)

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))
