"""Install the `engine` and `kernels` packages.

torch and DeepSpeed are pinned here but installed first by the Makefile (torch from the machine's wheel
cache, DeepSpeed with DS_BUILD_OPS=0 and no build isolation), so `pip install -e .` finds them present.
"""
from setuptools import find_packages, setup

setup(
    name="cmt-engine",
    version="0.1.0",
    description="Kernel-accelerated training engine for Consistency Mid-Training (CMT)",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "deepspeed==0.19.8",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "scikit-learn>=1.4",
        "scipy>=1.11",
        "pillow>=10.0",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "lpips==0.1.4",
        "pybind11>=2.12",
        "ninja>=1.11",
    ],
    extras_require={
        "dev": ["pytest>=8.0", "diffusers==0.42.1"],
        "dali": ["nvidia-dali-cuda130==2.4.0"],
    },
)
