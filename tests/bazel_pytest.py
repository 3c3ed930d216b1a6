"""``py_test`` entry point under Bazel: runs pytest on the test files given as arguments.

Bazel runs a ``py_test``'s ``main`` as a script; the test modules define no ``__main__``, so each
target runs this file with its test module as the argument (BUILD: ``args``).
"""

import sys

import pytest

if __name__ == "__main__":
    sys.exit(pytest.main(["-p", "no:cacheprovider", *sys.argv[1:]]))
