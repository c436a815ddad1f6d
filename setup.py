from setuptools import find_packages, setup

setup(
    name="ra_kernels",
    version="0.1.0",
    description="Residual Attention Network on hand-written Triton kernels, with a NumPy reference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ra_kernels", "ra_kernels.*", "reference", "reference.*", "train", "train.*",
                                    "bench", "bench.*"]),
    python_requires=">=3.10",
    # triton: 3.6 is what the GPU machines have; CI and CPU machines take the newest 3.x.
    install_requires=["numpy>=1.26,<3", "scipy>=1.11,<2", "triton>=3.6,<4", "tqdm>=4.60,<5", "matplotlib>=3.8,<4",
                      "ml_dtypes>=0.4,<1", "Pillow>=10,<14"],
    extras_require={
        "cuda12": ["cupy-cuda12x>=13,<15"],
        "cuda13": ["cupy-cuda13x>=14,<15"],
        # Data-parallel training (mpirun): mpi4py, and MPICH's own wheel for an MPI library and mpiexec
        # where the system has none (an existing MPI serves as well: then install mpi4py alone).
        "mpi": ["mpi4py>=4,<5", "mpich>=4.2,<6"],
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "mpi4py>=4,<5", "mpich>=4.2,<6"],
        "bench": ["torch>=2.6,<3"],  # the cuDNN baseline; never imported by the library
    },
    entry_points={"console_scripts": ["ra-train = train.cifar:main", "ra-train-imagenet = train.imagenet:main",
                                          "ra-masks = train.masks:main"]},
)
