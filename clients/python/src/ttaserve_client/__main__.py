"""``python -m ttaserve_client``: the ``tta`` command line."""

from ttaserve_client.cli import main

main()
