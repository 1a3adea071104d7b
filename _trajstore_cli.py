"""The ``trajstore`` command's entry point, outside the package so that a Ctrl-C while the
package and its dependencies are still being imported (a second or two) also ends in one line
and exit 130, not a traceback. Everything else is :func:`trajstore.cli.main`."""

import sys


def main() -> int:
    try:
        from trajstore.cli import main as cli_main
    except KeyboardInterrupt:
        print("trajstore: interrupted while starting (nothing was done); run the same command to resume", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
