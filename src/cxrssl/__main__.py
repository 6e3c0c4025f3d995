"""``python -m cxrssl <verb>``: the ``cxrssl`` command (:mod:`cxrssl.cli`)."""

from cxrssl.cli import main

raise SystemExit(main())
