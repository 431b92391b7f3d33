"""Entry points: the ``ganforge`` command line, and the modules that launchers run."""
