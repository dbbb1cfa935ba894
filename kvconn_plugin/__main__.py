"""``python -m kvconn_plugin [doctor|build-info]`` (same as the ``kvconn`` command)."""

import sys

from kvconn_plugin.cli import main

sys.exit(main(sys.argv[1:] or ["build-info"]))
