"""capsem: Matrix capsules with EM routing in TensorFlow 2 / Keras 3."""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="capsem",
    version="0.1.0",
    description=(
        "Matrix capsules with EM routing (Hinton, Sabour & Frosst, ICLR 2018) "
        "as Keras 3 layers, numerically faithful to the TF1 code of the article "
        "'Understanding Matrix capsules with EM Routing'."
    ),
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # The full licence text, in the sdist and the wheel's metadata.
    license_files=["LICENSE"],
    packages=find_packages(exclude=("tests", "tests.*")),
    # The C++ source of the native EM routing kernels, compiled on first use
    # (capsem/native.py).
    package_data={"capsem": ["native/*.cc"]},
    python_requires=">=3.9",
    install_requires=[
        # TF 2.16 is the first release whose tf.keras is Keras 3; 2.21 is tested here.
        "tensorflow-cpu>=2.16,<2.22; platform_machine=='x86_64'",
        "tensorflow>=2.16,<2.22; platform_machine!='x86_64'",
        "keras>=3.0,<4",
        "tensorboard>=2.16,<2.22",
        "tensorflow-datasets>=4.9,<5",
        "numpy>=1.23,<3",
        "absl-py>=1.0,<3",
        # capsem.report plots the curves of training runs.
        "matplotlib>=3.5",
    ],
    extras_require={"test": ["pytest>=7"]},
)
