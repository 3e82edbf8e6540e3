"""``python -m ckakd <command>``: the same as the ``ckakd`` console script."""

from ckakd.cli import main

raise SystemExit(main())
