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
        # `tensorflow`, not `tensorflow-cpu`: one package for CPUs and GPUs (its Linux
        # x86-64 wheel holds the CUDA kernels; the [cuda] extra adds NVIDIA's libraries).
        # The cost to a CPU install, measured for 2.21 (README "Set-up"): a 572 MB wheel
        # instead of 274 MB, 30 s to install instead of 19 s. An extra cannot swap
        # tensorflow-cpu for tensorflow: both would be installed over each other.
        "tensorflow>=2.16,<2.22",
        "keras>=3.0,<4",
        "tensorboard>=2.16,<2.22",
        "tensorflow-datasets>=4.9,<5",
        "numpy>=1.23,<3",
        "absl-py>=1.0,<3",
        # capsem.report plots the curves of training runs.
        "matplotlib>=3.5",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3"],
        # GPUs: TensorFlow's own way to bring the CUDA libraries (Linux).
        "cuda": ["tensorflow[and-cuda]>=2.16,<2.22"],
    },
)
