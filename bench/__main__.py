"""``python -m bench``: see :mod:`bench.run`."""

from bench.run import main

if __name__ == '__main__':
    main()
