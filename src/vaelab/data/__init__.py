"""Data sources held as in-memory tensors: Fashion-MNIST and MNIST (mnist.py), other torchvision datasets
(torchvision_data.py), a folder of the user's images (image_folder.py); their base and batches: tensors.py."""
