"""``python -m fl_server.launch``: the launcher's command line (see :mod:`fl_server.runtime.launch`)."""

from fl_server.runtime.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
