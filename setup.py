"""Build script. Package metadata lives in pyproject.toml; this file only adds the C++/CUDA
extension (see csrc/). Without torch importable at build time it installs the pure-Python
package, and the extension is compiled just in time on first use (costeer_kernels/_extension.py).
"""
from setuptools import setup

setup()
