"""The data layer: every loader yields ``(images, labels)`` on the training device, in fixed-size batches.

``common`` (names, statistics, the loader contract, ``DataSpec``) and ``sampling`` (which samples each rank visits)
are the leaves; ``in_memory`` (digits, CIFAR), ``image_folder``, ``dali_loader`` and ``torchvision_loader`` build on
them; ``loaders.build_loaders`` chooses among them. Imports only go that way.
"""
