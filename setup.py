"""Package discovery. ``kernels/`` and ``cli/`` sit at the top of the repository (the user's
design card) but install as ``kdcache.kernels`` and ``kdcache.cli``; every package under the
three folders is found here, so a new subpackage cannot be left out of the wheel."""

from setuptools import find_packages, setup

MAPPED = {"kdcache.kernels": "kernels", "kdcache.cli": "cli"}


def packages() -> list[str]:
    found = find_packages(include=["kdcache", "kdcache.*"])
    for name, folder in MAPPED.items():
        found += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(found)


setup(packages=packages(), package_dir={"kdcache": "kdcache", **MAPPED})
