try:  # the console entry point's handling of Ctrl-C and of the exit (``--nproc`` ranks run this)
    from _trajstore_cli import main
except ImportError:  # the package alone on the path
    from .cli import main

raise SystemExit(main())
