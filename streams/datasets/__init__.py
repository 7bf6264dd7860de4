"""Image classification data sets held in memory as uint8 tensors.

Every reader returns an :class:`ArrayDataset` (``base.py``): ``images`` uint8
``(N, C, H, W)``, ``labels`` int64 ``(N,)``, the class names and the per-channel
normalisation statistics. Files are read with vectorised ``numpy.frombuffer`` (no pickle) and
validated: a corrupt or truncated file raises :class:`DataFormatError` naming the file and
what was expected.

Readers, one module each, found by name through :func:`load_dataset` (``registry.py``):
    * ``fashion_mnist``: IDX files (``idx.py``), gzipped or raw (Debian's
      ``dataset-fashion-mnist``), with a checksummed download (``download.py``).
    * ``cifar10``: the binary version (``data_batch_1.bin`` .. ``test_batch.bin``).
    * ``image_folder``: one sub-folder per class, read with PIL and resized.
    * ``synthetic``: seeded class-conditional images whose difficulty grows with the class id.
    * ``tiny_imagenet``: Tiny-ImageNet read in place from its zip or folder (``tiny_imagenet.py``).
"""

from streams.datasets.base import ArrayDataset, DataFormatError
from streams.datasets.cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10_DEFAULT_ROOT,
    CIFAR10_ENV,
    load_cifar10,
    read_cifar10_batch,
)
from streams.datasets.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_ROOT,
    FASHION_MNIST_ENV,
    FASHION_MNIST_MIRRORS,
    download_fashion_mnist,
    load_fashion_mnist,
)
from streams.datasets.idx import read_idx
from streams.datasets.image_folder import load_image_folder
from streams.datasets.registry import list_datasets, load_dataset, shares_images
from streams.datasets.synthetic import make_synthetic
from streams.datasets.tiny_imagenet import (
    TINY_IMAGENET_ENV,
    TINY_IMAGENET_SPLITS,
    find_tiny_imagenet,
    load_tiny_imagenet,
)

__all__ = [
    "ArrayDataset",
    "DataFormatError",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_CLASSES",
    "FASHION_MNIST_MIRRORS",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_DEFAULT_ROOT",
    "CIFAR10_ENV",
    "CIFAR10_DEFAULT_ROOT",
    "read_idx",
    "read_cifar10_batch",
    "load_fashion_mnist",
    "download_fashion_mnist",
    "load_cifar10",
    "load_image_folder",
    "make_synthetic",
    "load_tiny_imagenet",
    "find_tiny_imagenet",
    "TINY_IMAGENET_ENV",
    "TINY_IMAGENET_SPLITS",
    "load_dataset",
    "list_datasets",
    "shares_images",
]
