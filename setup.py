"""Build script: only decides which native libraries to compile (see csrc/)."""
from setuptools import setup

setup()
