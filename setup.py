"""Packaging for the CBIR pipelines.

The same file is what Dataflow workers install through ``--setup_file``, so the
runtime dependencies here are exactly the pins of ``requirements.in`` (minus the
development tools): a worker resolves the versions the tests ran with.
"""

from pathlib import Path

from setuptools import find_packages, setup

_HERE = Path(__file__).parent
_DEV_ONLY = {"pytest", "ruff", "import-linter", "scikit-image", "selenium", "hnswlib", "openvino"}


def _runtime_requirements() -> list[str]:
    reqs = []
    for line in (_HERE / "requirements.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and line.split("==")[0].lower() not in _DEV_ONLY:
            reqs.append(line)
    return reqs


setup(
    name="cbir",
    version="0.1.0",
    description="Content-based image retrieval as Apache Beam batch pipelines",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["artefacts*", "index_builder*", "plumbing*", "models*", "transforms*", "search*",
                                    "evaluation*", "inspection*", "serving*", "pipelines*"]),
    package_data={"serving": ["static/*.html", "static/*.js", "static/*.css"]},
    install_requires=_runtime_requirements(),
    extras_require={"demo": ["scikit-image==0.26.0"]},
    entry_points={"console_scripts": ["cbir=pipelines.cli:main"]},
)
