"""``python -m ckakd <command>``: the same as the ``ckakd`` console script."""

from ckakd.apps.cli import main

raise SystemExit(main())
