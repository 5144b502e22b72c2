"""KeySuggestingParser: LightningCLI's parser, whose config errors name the closest valid key ("did you mean ...").

A misspelled key in a LightningCLI config fails before training, but jsonargparse's message only says that the key
is not accepted, deep inside a list of union errors for ``trainer.callbacks``. Pass this parser to the
``LightningCLI`` of your script and the error starts with the unknown key, where it was and the closest valid one:

    LightningCLI(MyModel, MyData, parser_class=KeySuggestingParser)

    error: unknown key 'z_treshold' in the init_args of lightning_gradguard.AdaptiveGradientClipping: did you mean
    'z_threshold'?

It works for every class in the config (callbacks, loggers, the model) and for the config's own keys
(``trainer.max_step`` -> ``trainer.max_steps``); jsonargparse's full message follows unchanged. Nothing else about
parsing changes. :func:`suggest_keys` does the same to any such message.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterable
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

__all__ = ["KeySuggestingParser", "suggest_keys"]

# jsonargparse's messages for an unknown key (jsonargparse 4.x: _core.py check_config, _typehints.py adapt_class_type)
_IN_CLASS = re.compile(r"Problem with given class_path '(?P<path>[\w.]+)':\s*Option '(?P<key>[^']+)' is not accepted")
_IN_PARSER = re.compile(
    r"(?:Subcommand '\w+' does not accept option|Option) '(?P<key>[\w.-]+)'(?: is not accepted)?"
    r"|Group '(?P<group>[\w.]+)' does not accept option '(?P<sub>[\w.-]+)'"
)
_HEAD = "unknown key "


def suggest_keys(message: str, parser: Any = None) -> str:
    """``message`` (a jsonargparse error) with a first line per unknown key it names: where the key was and the
    closest valid key, or the valid keys when none is close.

    Args:
        message: the error message.
        parser: the parser that raised it (its keys answer for a key of the config itself; None: classes only).

    Example:
        >>> print(suggest_keys("Problem with given class_path 'lightning_gradguard.NaNGuard':\\n"
        ...                    "  Option 'lr_facter' is not accepted"))  # doctest: +ELLIPSIS
        unknown key 'lr_facter' in the init_args of lightning_gradguard.NaNGuard: did you mean 'lr_factor'?
        Problem with given class_path ...
    """
    if message.startswith(_HEAD):  # a message that went through here already (nested parsers)
        return message
    hints: list[str] = []
    for m in _IN_CLASS.finditer(message):
        keys = _init_args(m["path"])
        if keys is not None:
            hints.append(_hint(m["key"], keys, f"the init_args of {m['path']}"))
    found = _IN_PARSER.search(message) if not hints and parser is not None else None
    if found is not None:
        key = found["key"] or f"{found['group']}.{found['sub']}"
        keys = _parser_keys(parser)
        if keys:
            hints.append(_hint(key, keys, "the config"))
    unique = list(dict.fromkeys(hints))
    return "\n".join([*unique, message]) if unique else message


def _hint(key: str, valid: Iterable[str], where: str) -> str:
    """One line: the unknown ``key``, ``where`` it was, and the closest of ``valid`` (same dotted prefix)."""
    prefix, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in valid if k.rpartition(".")[0] == prefix}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if close:
        return f"{_HEAD}'{key}' in {where}: did you mean '{siblings[close[0]]}'?"
    listed = ", ".join(sorted(siblings)) or "none"
    return f"{_HEAD}'{key}' in {where}; the valid keys there: {listed}"


def _init_args(class_path: str) -> list[str] | None:
    """The init_args that jsonargparse accepts for ``class_path`` (None when the class cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    try:  # jsonargparse's own view (it follows **kwargs into the functions they are passed to)
        from jsonargparse import ArgumentParser

        inner = ArgumentParser(exit_on_error=False)
        inner.add_class_arguments(cls, fail_untyped=False)
        keys = _parser_keys(inner)
        if keys:
            return keys
    except Exception:  # noqa: BLE001 - only a hint: fall back to the signature
        pass
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _parser_keys(parser: Any) -> list[str]:
    """The keys a jsonargparse parser accepts (its actions' destinations, help and config files left out)."""
    skip = {"help", "config", "print_config", "print_shtab", "print_completion"}
    keys = []
    for action in getattr(parser, "_actions", []):
        dest = getattr(action, "dest", None)
        if isinstance(dest, str) and dest and dest != "SUPPRESS" and dest.rpartition(".")[2] not in skip:
            keys.append(dest)
    return keys


class KeySuggestingParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors start with the closest valid key for each unknown one.

    Pass it as ``LightningCLI(..., parser_class=KeySuggestingParser)`` (it works with ``LightningCLI`` subclasses
    too); see the module docstring for what the error looks like.

    Example:
        >>> parser = KeySuggestingParser(exit_on_error=False)
        >>> _ = parser.add_argument("--max_steps", type=int)
        >>> try:
        ...     parser.parse_object({"max_step": 3})
        ... except Exception as error:
        ...     print(error)
        unknown key 'max_step' in the config: did you mean 'max_steps'?
        Option 'max_step' is not accepted
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not getattr(self, "_inner_parser", False):  # jsonargparse's parser of one class: the outer one hints
            subcommand = getattr(ex, "subcommand_parser", None)  # the parser of a subcommand's config ("fit")
            message = suggest_keys(message, subcommand or self)
        super().error(message, ex)
