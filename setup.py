"""Build script. Metadata lives in pyproject.toml; this file only decides which extensions to build."""
from setuptools import setup

setup()
