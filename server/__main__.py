"""``python -m server``: start TTAServe with uvicorn (one process; it owns one device)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

import uvicorn

from server.api import create_app
from server.api.drain import Drain
from server.clip import load_backbone
from server.connections import protocol, raise_descriptor_limit
from server.errors import ConfigError
from server.logs import configure_logging
from server.service import check_settings
from server.settings import parse_args

log = logging.getLogger("ttaserve")

DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CLOSE_S = 5  # after a drain: how long uvicorn waits for idle connections to close and the lifespan to end


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM (or Ctrl-C) drains instead of closing the socket at once.

    While draining the socket stays open: ``/readyz`` answers 503 ``shutting_down``, new classify requests
    get 503 with ``Retry-After``, and the requests in flight finish, for at most ``grace_s``. Then uvicorn
    shuts down as usual (the engine stops after the last connection closed) and the process exits 0. A
    second signal stops at once, the way uvicorn does.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float):
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig not in DRAIN_SIGNALS or self._drainer is not None or not self.started:
            super().handle_exit(sig, frame)
            if self._drainer is not None:
                self.force_exit = True  # the second signal: stop without waiting
            return
        # A signal handler must not block: the wait runs on a thread, the event loop keeps serving.
        self._drainer = threading.Thread(target=self._drain, args=(signal.Signals(sig).name,), name="tta-drain")
        self._drainer.start()

    def _drain(self, name: str) -> None:
        active = self.drain.begin()
        log.info(
            "%s: draining; /readyz answers 503, new requests get 503 shutting_down; waiting up to %g s for %d "
            "request(s) in flight (TTA_DRAIN_TIMEOUT_S)",
            name,
            self.grace_s,
            active,
        )
        if self.drain.wait_idle(self.grace_s):
            log.info("drained: no request in flight; shutting down")
        else:
            log.warning(
                "%d request(s) still in flight after %g s (TTA_DRAIN_TIMEOUT_S); shutting down without them",
                self.drain.active,
                self.grace_s,
            )
            self.config.timeout_graceful_shutdown = 0  # the grace period is spent: close what is left now
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    configure_logging(settings.log_level, settings.log_format)
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
    before, after = raise_descriptor_limit()
    if after > before:
        log.info("open-file limit raised from %d to %d (connections each hold one)", before, after)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=CLOSE_S,
        http=protocol(settings.first_request_timeout_s),  # a connection that sends nothing is closed
        timeout_keep_alive=settings.keep_alive_timeout_s,
    )
    server = DrainingServer(config, app.state.drain, settings.drain_grace_s)
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
