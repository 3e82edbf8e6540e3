"""The applications: the ``ckakd`` command and the jobs it runs. Nothing in the library imports this package.

* :mod:`ckakd.apps.cli`: the ``ckakd`` parser and dispatch, every classification and detection command;
* :mod:`ckakd.apps.errors`: how every command maps an error to its exit status, and the missing-extra message;
* :mod:`ckakd.apps.demo` (``ckakd demo``, also ``ckakd-demo``), :mod:`ckakd.apps.study` (``ckakd study``) and
  :mod:`ckakd.apps.detect_demo` (``ckakd detect-demo``), with their figures in :mod:`ckakd.apps.plots`;
* :mod:`ckakd.apps.selftest`: ``ckakd selftest``, every op on every active backend against ``ckakd.reference``.
"""
