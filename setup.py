"""Installs ms_cxr: multi-scale, multi-label chest X-ray classification in JAX/Flax."""

import setuptools

setuptools.setup(
  name='ms_cxr',
  version='0.1.0',
  description='Multi-scale, multi-label chest X-ray classification (SSBN DenseNet-121, MS-ANet) in JAX/Flax',
  long_description=open('README.md', encoding='utf-8').read(),
  long_description_content_type='text/markdown',
  packages=setuptools.find_packages(include=['ms_cxr', 'ms_cxr.*']),
  python_requires='>=3.11',
  install_requires=[
    'absl-py>=2.1',
    'flax>=0.10',
    'grain>=0.2.12',
    'jax>=0.7',
    'matplotlib>=3.7',
    'ml_collections>=1.0',
    'numpy>=1.26',
    'optax>=0.2.5',
    'orbax-checkpoint>=0.11',
    'pillow>=10.0',
    'pydicom>=3.0',
    'safetensors>=0.4',
    'scikit-learn>=1.4',
    'tensorboardX>=2.6',
    'tensorflow-datasets>=4.9.7',
  ],
  extras_require={
    'test': ['pytest>=8.0', 'pytest-xdist>=3.5', 'ruff==0.17.6'],
  },
)
