//! Datasets for deeprepair: CIFAR-10 binary files, image folders (`<split>/<class>/*.jpg`),
//! CIFAR-10-C `.npy` files, a compact self-describing encoding for storing datasets, seeded
//! subsets, PNG/JPEG codecs and `data fetch` (download + verify + unpack CIFAR-10).
//!
//! Images are always RGB8, NHWC, row-major. Every error is a [`DataError`] naming the file
//! (or URL) and what was wrong or expected; no function panics on bad input.

mod cifar;
mod codec;
mod dataset;
mod error;
mod fetch;
mod folder;
mod npy;

pub use cifar::{
    find_cifar_binary_dir, load_cifar_binary, load_cifar_binary_files, load_dataset,
    load_dataset_with_classes, to_cifar_binary, Split, CIFAR10_BINARY_SUBDIR, CIFAR10_CLASSES,
    CIFAR_RECORD_LEN,
};
pub use codec::{decode_image, encode_png};
pub use dataset::{select_subset, Dataset, DATASET_FORMAT_VERSION, DATASET_MAGIC};
pub use error::DataError;
pub use fetch::{fetch_cifar10, CIFAR10_BINARY_MD5, CIFAR10_BINARY_URL};
pub use folder::{load_image_folder, load_images_dir_with_classes};
pub use npy::{read_cifar_c_npy, write_cifar_c_npy};
