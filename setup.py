"""Package list: every package under hyperfields/, plus hyperfields.configs, which pyproject.toml maps to the
top-level configs/ folder; setuptools' package discovery cannot find a package under a name its folder lacks."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["hyperfields*"]), "hyperfields.configs"])
