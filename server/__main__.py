"""``python -m server``: start TTAServe with uvicorn (one process; it owns one device)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from server.api import create_app
from server.clip import load_backbone
from server.errors import ConfigError
from server.logs import configure_logging
from server.service import check_settings
from server.settings import parse_args

log = logging.getLogger("ttaserve")


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    configure_logging(settings.log_level)
    try:
        # Checked here too, so a bad setting ends in one clear line instead of a start-up traceback.
        spec = check_settings(settings)
        if args.preload_only:
            load_backbone(settings, spec).warm_up()
            log.info("preloaded %s; exiting (--preload-only)", spec.display)
            return 0
        app = create_app(settings)  # reads the API keys
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    server = uvicorn.Server(config)
    fatal: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        server.should_exit = True

    app.state.on_fatal = on_fatal
    server.run()
    if fatal:
        log.error("exiting: the model could not be loaded: %s", fatal[0])
        return 1
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
