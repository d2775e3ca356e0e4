"""`python -m kdcache` runs the command-line interface."""

from kdcache.cli.app import main

if __name__ == "__main__":
    main()
