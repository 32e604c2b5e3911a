"""A click option that takes one or more values: ``--weights A B C`` (and ``--weights A --weights B``).

click options take a fixed number of values (``nargs=-1`` is for arguments only), so this
option reads its first value as usual and then keeps the following words up to the next
option. Shell globs work: ``--weights run/weights/snapshot*.safetensors``.
"""

from __future__ import annotations

from typing import Any

import click


class MultiValueOption(click.Option):
    """``--name V1 V2 ...``: every word after the flag up to the next ``-option`` is a value.

    The value is a tuple (as with ``multiple=True``, which it implies; repeating the flag adds
    to it). Only use it on commands without positional arguments, which it would swallow.

    Examples:
        >>> @click.command()
        ... @click.option("--weights", cls=MultiValueOption, required=True)
        ... def cmd(weights): print(weights)
        >>> cmd(["--weights", "a", "b", "--weights", "c"], standalone_mode=False)
        ('a', 'b', 'c')
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["multiple"] = True
        super().__init__(*args, **kwargs)

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        # click's parser keeps its options in _long_opt/_short_opt (unchanged since click 7);
        # without them the option still works as a repeatable one.
        for table in (getattr(parser, "_long_opt", {}), getattr(parser, "_short_opt", {})):
            for name in self.opts:
                opt = table.get(name)
                if opt is not None and not getattr(opt, "_cnnkit_greedy", False):
                    opt.process = _greedy(opt.process, parser)
                    opt._cnnkit_greedy = True


def _greedy(process: Any, parser: Any) -> Any:
    prefixes = tuple(getattr(parser, "_opt_prefixes", {"-", "--"}))

    def consume(value: Any, state: Any) -> None:
        process(value, state)
        while state.rargs and not (state.rargs[0].startswith(prefixes) and len(state.rargs[0]) > 1):
            process(state.rargs.pop(0), state)

    return consume
