"""Packaging beside setup.cfg (which holds the metadata): the bundle folders ship inside the wheel.

``bundles/<name>/`` (configs, docs, licence, large_files.yml; never trained weights) becomes
``segreport/bundles/<name>/`` in the wheel, so ``segreport infer --bundle medsegtext`` works after
``pip install`` from any folder (segreport.run.bundles.shipped_bundles_dir).
"""

from setuptools import find_packages, setup

BUNDLE_FILES = ["*/configs/*", "*/docs/*", "*/LICENSE", "*/large_files.yml"]

setup(
    packages=find_packages(include=["segreport", "segreport.*"]) + ["segreport.bundles"],
    package_dir={"segreport.bundles": "bundles"},
    package_data={"segreport.bundles": BUNDLE_FILES},
)
