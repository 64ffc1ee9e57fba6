"""adaln.data: embedded data sets (8x8 digits, their captions, CCD molecules in adaln.data.ccd) and user
image folders; images as float tensors in [-1, 1]."""

from adaln.data.digits import DIGITS_NUM_CLASSES, load_digits
from adaln.data.image_folder import IMAGE_EXTENSIONS, ImageFolderDataset, load_image_folder

__all__ = ["DIGITS_NUM_CLASSES", "IMAGE_EXTENSIONS", "ImageFolderDataset", "load_digits", "load_image_folder"]
