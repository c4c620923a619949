"""``python -m torchprobe ...`` runs the ``torchprobe`` command (see :mod:`torchprobe.cli`)."""
from .cli import main

raise SystemExit(main())
