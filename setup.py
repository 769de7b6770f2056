"""Which packages the distribution holds; everything else is in pyproject.toml.

The migrations stay in the repository's top-level ``alembic/`` (where the ``alembic`` command
and alembic.ini expect them) and travel in the wheel as ``service.store.alembic``, so that an
installed service migrates a database without a checkout (service/store/migrations.py).
pyproject.toml cannot add a mapped package to the ones it finds; this file can. The folder has
no ``__init__.py``: a top-level ``alembic`` package in a checkout would hide the alembic library.
"""

from setuptools import find_namespace_packages, setup

MIGRATIONS = "service.store.alembic"

setup(
    packages=[
        *find_namespace_packages(include=["service*", "workers*"]),
        MIGRATIONS,
        f"{MIGRATIONS}.versions",
    ],
    package_dir={MIGRATIONS: "alembic"},
    package_data={"service.api": ["static/*"], MIGRATIONS: ["script.py.mako"]},
)
