"""Builds the native module vmm._native with cffi as part of the install."""
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
