"""What the selector's command-line tools (build, train, apply) share."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except where it would mislead or repeat: a help text
    that already says its default ("(default: the data file's)") gets no second one, and a
    None default (meaning "not given", which the help then explains) prints no "(default:
    None)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)
