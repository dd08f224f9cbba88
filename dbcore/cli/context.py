"""What every ``dbmigrate`` sub-command receives, and the options they all share."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable

from dbcore.connection import Env, Target, resolve_target
from dbcore.settings import Settings

if TYPE_CHECKING:  # the tunnel is imported only when the proxy environment needs it
    from dbcore.proxy import Tunnel

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Context:
    """What every sub-command receives: parsed arguments and settings, and the target on demand."""

    def __init__(self, args: argparse.Namespace, settings: Settings):
        self.args = args
        self.settings = settings
        self._target: Target | None = None
        self._tunnel: Tunnel | None = None

    @property
    def target(self) -> Target:
        """The database to act on (resolved lazily: `new` and `lint` need none).

        In the proxy environment the tunnel is opened here and closed by :meth:`close`.
        """
        if self._target is None:
            target = resolve_target(self.settings, self.args.env, self.args.database_url)
            if target.env is Env.PROXY:
                from dbcore.proxy import open_tunnel

                self._tunnel = open_tunnel(self.settings)
                target = self._tunnel.target_for(target)
            self._target = target
        return self._target

    def close(self) -> None:
        """Close the tunnel, if one was opened."""
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None


Handler = Callable[[Context], int]


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more (``--count``, ``--jobs``)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def common_options() -> argparse.ArgumentParser:
    """Options every sub-command accepts, before or after its name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", default=argparse.SUPPRESS,
                        help="target database (default: $DATABASE_URL, else the embedded local one)")
    common.add_argument("--migrations-dir", default=argparse.SUPPRESS,
                        help="folder of NNN_name.py migrations (default: ./migrations)")
    common.add_argument("--env", choices=[e.value for e in Env], default=argparse.SUPPRESS,
                        help="assert the environment; it must agree with FLY_APP_NAME / "
                             "USE_FLY_POSTGRES_FROM_LOCAL_PROXY")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="show debug logs and tracebacks")
    return common
